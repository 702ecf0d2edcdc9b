"""The offsite-tuning report: five evaluation settings, the privacy gap, emulator size and costs.

The five settings (Offsite-Tuning, arXiv 2302.04870, §2.7 of docs/offsite_tuning.md):

=============  ==================================  =============================================
setting        model evaluated                     role
=============  ==================================  =============================================
full_zs        original model, untrained           utility lower bound
emulator_zs    pretrained adapters + emulator      raw shipped artefact (lower = more private)
ft             adapter blocks tuned in the full    utility upper bound (same adapter budget)
emulator_ft    tuned adapters + emulator           what the data owner gets alone
plug_in        tuned adapters + original middle    what the model owner delivers
extraction     every emulator parameter tuned      optional: a stronger data owner (privacy audit)
=============  ==================================  =============================================

**Privacy gap** ``Δ = plug_in − emulator_ft`` in accuracy points: how much better the delivered model is
than what the data owner can get without the model owner (larger is better for the owner). The **extraction gap**
``plug_in − extraction`` asks the same of a data owner who fine-tunes every parameter the emulator holds (kept
compressed blocks, harmonizers, embeddings, adapters) instead of the adapters only: the model owner's protection
against the strongest use of the shipped artefact we field. Torch-free: plain dicts in, JSON / Markdown / PNG out.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SETTINGS: dict[str, str] = {
    "full_zs": "Full zero-shot",
    "emulator_zs": "Emulator zero-shot",
    "ft": "Full fine-tuning (same adapter blocks)",
    "emulator_ft": "Emulator fine-tuned",
    "plug_in": "Plug-in",
    "extraction": "Extraction: every emulator parameter fine-tuned by the data owner",
}


def privacy_gap(plug_in_acc: float, emulator_ft_acc: float) -> float:
    """``Δ = plug-in − emulator FT``, in accuracy points (inputs are fractions in [0, 1])."""
    return 100.0 * (plug_in_acc - emulator_ft_acc)


def wilson_interval(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy ``acc`` measured on ``n`` test examples (fractions).

    Raises:
        ValueError: for ``n < 1`` or ``acc`` outside [0, 1].
    """
    if n < 1 or not 0.0 <= acc <= 1.0:
        raise ValueError(f"wilson_interval: need n >= 1 and acc in [0, 1], got n={n}, acc={acc}.")
    denom = 1 + z * z / n
    centre = (acc + z * z / (2 * n)) / denom
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


@dataclass
class OffsiteReport:
    """Everything one offsite-tuning run measured.

    Attributes:
        title: first line of the table.
        settings: ``{setting: {"acc": fraction, "f1": macro-F1, ...}}`` for the keys of :data:`SETTINGS`.
        emulator: sizes, e.g. ``{"params": int, "full_params": int, "middle_params": int, ...}``.
        step_seconds: data-owner step time, ``{"emulator": s, "full": s}``.
        stage_seconds: wall time of each stage, ``{name: s}``.
        sweep: one row per emulator scale: ``{"alpha", "emulator_params", "emulator_ft", "plug_in", "gap"}``.
        arms: emulators compared on the same split, ``{name: {"params", "params_ratio", "emulator_zs",
            "emulator_ft", "plug_in", "gap"}}`` (accuracies as fractions, the gap in points).
        meta: what was run (model, task, sizes, steps, command); ``test_size`` sets the interval of full zero-shot.
    """

    title: str
    settings: dict[str, dict[str, float]]
    emulator: dict[str, Any] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    sweep: list[dict[str, float]] = field(default_factory=list)
    arms: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """The privacy gap in points, when both settings were measured."""
        s = self.settings
        if "plug_in" in s and "emulator_ft" in s:
            return privacy_gap(s["plug_in"]["acc"], s["emulator_ft"]["acc"])
        return None

    @property
    def extraction_gap(self) -> float | None:
        """``plug-in − extraction`` in points: the gap to a data owner who tunes every parameter of the emulator."""
        s = self.settings
        if "plug_in" in s and "extraction" in s:
            return privacy_gap(s["plug_in"]["acc"], s["extraction"]["acc"])
        return None

    @property
    def zero_shot_interval(self) -> tuple[float, float] | None:
        """95% Wilson interval of full zero-shot on ``meta["test_size"]`` examples, when both are known."""
        n = self.meta.get("test_size")
        if "full_zs" not in self.settings or not isinstance(n, int) or n < 1:
            return None
        return wilson_interval(self.settings["full_zs"]["acc"], n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the derived privacy gap, ratios and the full zero-shot interval."""
        out = asdict(self)
        out["privacy_gap_points"] = self.gap
        out["extraction_gap_points"] = self.extraction_gap
        interval = self.zero_shot_interval
        if interval is not None:
            out["full_zs_interval_95"] = list(interval)
            above = {"plug_in": self.settings["plug_in"]["acc"] > interval[1]} if "plug_in" in self.settings else {}
            above |= {name: row["plug_in"] > interval[1] for name, row in self.arms.items()}
            out["plug_in_above_full_zs_interval"] = above
        if {"emulator", "full"} <= self.step_seconds.keys() and self.step_seconds["full"] > 0:
            out["step_time_ratio_emulator_over_full"] = self.step_seconds["emulator"] / self.step_seconds["full"]
        return out

    def markdown(self) -> str:
        """The report as Markdown tables."""
        lines = [f"**{self.title}**", "", "| setting | acc | macro-F1 |", "|---|---|---|"]
        for key, name in SETTINGS.items():
            if key in self.settings:
                row = self.settings[key]
                lines.append(f"| {name} | {100 * row['acc']:.1f}% | {row.get('f1', float('nan')):.3f} |")
        if self.gap is not None:
            lines.append(f"| **Privacy gap Δ (plug-in − emulator FT)** | **{self.gap:+.1f} pts** | |")
        if self.extraction_gap is not None:
            lines.append(f"| **Extraction gap (plug-in − extraction)** | **{self.extraction_gap:+.1f} pts** | |")
        interval = self.zero_shot_interval
        if interval is not None:
            lines.append(
                f"| full zero-shot 95% interval (Wilson, n = {self.meta['test_size']}) | "
                f"{100 * interval[0]:.1f}–{100 * interval[1]:.1f}% | |"
            )
        if self.arms:
            lines += [
                "",
                "| emulator (same split, steps, lr) | params ratio | emulator ZS | emulator FT | plug-in | Δ | "
                "plug-in above full ZS's 95% interval |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, r in self.arms.items():
                above = "yes" if interval is not None and r["plug_in"] > interval[1] else "no"
                lines.append(
                    f"| {name} | {r['params_ratio']:.3f} | {100 * r['emulator_zs']:.1f}% | "
                    f"{100 * r['emulator_ft']:.1f}% | {100 * r['plug_in']:.1f}% | {r['gap']:+.1f} | {above} |"
                )
        if self.emulator:
            e = self.emulator
            lines += ["", "| emulator | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in e.items()]
        if self.step_seconds:
            lines += ["", "| data-owner step | s/step |", "|---|---|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in self.step_seconds.items()]
            ratio = self.to_dict().get("step_time_ratio_emulator_over_full")
            if ratio is not None:
                lines.append(f"| emulator / full | {ratio:.2f} |")
        if self.stage_seconds:
            lines += ["", "| stage | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in self.stage_seconds.items()]
        if self.sweep:
            lines += ["", "| α | emulator params | emulator FT | plug-in | Δ |", "|---|---|---|---|---|"]
            for r in self.sweep:
                lines.append(
                    f"| {r['alpha']:g} | {r['emulator_params']:,} | {100 * r['emulator_ft']:.1f}% | "
                    f"{100 * r['plug_in']:.1f}% | {r['gap']:+.1f} |"
                )
        return "\n".join(lines)

    def write(self, folder: str | Path) -> dict[str, Path]:
        """Write ``offsite_report.json``, ``.md`` and, with a sweep of two or more scales, ``.png``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "offsite_report.json", "md": folder / "offsite_report.md"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str))
        paths["md"].write_text(self.markdown() + "\n")
        if len(self.sweep) >= 2:
            png = plot_sweep(self.sweep, folder / "offsite_report.png", self.title)
            if png is not None:
                paths["png"] = png
        return paths


def plot_sweep(sweep: list[dict[str, float]], path: str | Path, title: str = "") -> Path | None:
    """Utility (plug-in accuracy) against privacy gap, one point per emulator scale α; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    gaps = [r["gap"] for r in sweep]
    utility = [100 * r["plug_in"] for r in sweep]
    ax.plot(gaps, utility, "o-")
    for r, x, y in zip(sweep, gaps, utility):
        ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("privacy gap Δ = plug-in − emulator FT (points)")
    ax.set_ylabel("plug-in accuracy (%)")
    ax.set_title(textwrap.fill(title or "utility vs privacy gap", 48), fontsize=9)  # long titles would be cut
    ax.margins(0.15)  # room for the α labels
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
