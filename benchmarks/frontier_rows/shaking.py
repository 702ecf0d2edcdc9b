"""The shaking rows (CypherTalk, Chen et al., arXiv 2403.07283): the implanted shaken model, then a central row.

The row file is a central row's (:mod:`frontier_rows.central`) with ``implant``: the one-off implantation's time and
provenance. The audit (MembershipAudit after EmbeddingShaking with ``recovery='horizontal'``) attacks the recovered
model, the one the data owner ends with and queries in plain text; members = the training split, non-members = the
held-out test split (:mod:`privtune.attacks.membership`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from privtune.eval.frontier import Row
from privtune.eval.provenance import run_provenance

from .central import run_central
from .common import ROOT, Clock, log, torch_threads

IMPLANT_CONFIG = "configs/shaking/smollm2_implant.yaml"
_KEY_OPTIONS = ("key_path", "operators", "chain_length", "chain", "scales", "permute", "pin")


def _init_args(cfg: dict[str, Any], name: str, where: Path | str) -> dict[str, Any]:
    found = [cb.get("init_args", {}) for cb in cfg["trainer"]["callbacks"] if cb["class_path"].endswith(f".{name}")]
    if len(found) != 1:
        raise ValueError(f"{where}: a shaking row needs exactly one {name} callback; found {len(found)}.")
    return found[0]


def implant_config(row_config: Path) -> tuple[dict[str, Any], Path]:
    """``configs/shaking/smollm2_implant.yaml`` with the row's key options and the row's model folder as ``save_dir``.

    The row's config decides (one source of truth): its ``EmbeddingShaking`` key options (``key_path``, the chain
    and scales) and its ``model.init_args.model`` (the implanted shaken model, written by ShakeRecovery's
    ``save_dir``). Returns the config and the model folder.
    """
    import yaml

    row = yaml.safe_load(row_config.read_text())
    shaking = _init_args(row, "EmbeddingShaking", row_config)
    model_dir = Path(row["model"]["init_args"]["model"])
    cfg = yaml.safe_load((ROOT / IMPLANT_CONFIG).read_text())
    implant = _init_args(cfg, "EmbeddingShaking", IMPLANT_CONFIG)
    for option in _KEY_OPTIONS:
        implant.pop(option, None)
        if option in shaking:
            implant[option] = shaking[option]
    cfg["model"]["init_args"]["save_dir"] = str(model_dir)
    cfg["trainer"]["default_root_dir"] = f"{model_dir}_run"
    return cfg, model_dir


def ensure_implanted(row_config: Path) -> dict[str, Any]:
    """The shaking row's prerequisite: the implanted shaken model, made by ``train.py`` when its folder is missing.

    CypherTalk (Chen et al., arXiv 2403.07283) tunes a model whose representation layer is shaken with the data
    owner's key and implanted (awareness + function recovery on public text) so that it works under the key; the
    frontier's shaking rows tune that model, so a fresh clone runs :data:`IMPLANT_CONFIG` first (with the row's key
    and model folder, :func:`implant_config`). Its time and provenance are kept in ``<model>_implant.json`` and
    returned (``ran_here``: whether this call made it), so every row file of the key carries the one-off cost.
    """
    import yaml

    cfg, model_dir = implant_config(row_config)
    record = model_dir.with_name(f"{model_dir.name}_implant.json")
    if (model_dir / "config.json").exists():
        found = json.loads(record.read_text()) if record.exists() else {"model": str(model_dir), "record": None}
        return found | {"ran_here": False}
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    written = model_dir.with_name(f"{model_dir.name}_implant.yaml")
    written.write_text(f"# {IMPLANT_CONFIG} with the key options of {row_config}\n" + yaml.safe_dump(cfg))
    from train import main as train_main

    log(f"implanted model {model_dir} is missing: train.py fit --config {written}")
    clock = Clock()
    cli = train_main(["fit", "--config", str(written)])
    wall, cpu = clock.read()
    if not (model_dir / "config.json").exists():
        raise RuntimeError(f"{written}: the implantation ran but wrote no model to {model_dir}.")
    info = {
        "config": IMPLANT_CONFIG,
        "written_config": str(written),
        "key_options_from": str(row_config.relative_to(ROOT) if row_config.is_relative_to(ROOT) else row_config),
        "model": str(model_dir),
        "key_path": _init_args(cfg, "EmbeddingShaking", written)["key_path"],
        "steps": cli.trainer.global_step,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "torch_threads": torch_threads(),
        "provenance": run_provenance(),
    }
    record.write_text(json.dumps(info, indent=1) + "\n")
    del cli
    return info | {"ran_here": True}


def run_shaking(row: Row, seed: int, run_dir: Path, sets: list[str], controls: dict | None) -> dict[str, Any]:
    """A shaking row: the implanted model on demand (:func:`ensure_implanted`), then :func:`run_central`.

    The audit (MembershipAudit after EmbeddingShaking with ``recovery='horizontal'``) attacks the recovered model,
    the one the data owner ends with and queries in plain text; its reference is the untuned implanted model seen
    through the same recovery. ``implant`` records the prerequisite (its wall time counts once per key, not in the
    row's ``wall_seconds``).
    """
    implant = ensure_implanted(ROOT / row.config)
    return run_central(row, seed, run_dir, sets, controls) | {"implant": implant}
