"""privtune's command line: ``python train.py {fit,validate,test} --config configs/....yaml [overrides]``.

Any LightningModule / LightningDataModule importable by its class path can be named in a config
(``class_path: privtune.modules.TextClassifier``); ``--print_config`` shows every option.
"""

from lightning.pytorch.cli import LightningCLI

import privtune.callbacks  # noqa: F401  (registers the callbacks' import paths for short names)
import privtune.datamodules  # noqa: F401
import privtune.modules  # noqa: F401


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` for programmatic use and tests)."""
    return LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
