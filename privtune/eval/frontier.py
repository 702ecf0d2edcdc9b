"""The privacy-utility-cost frontier: every method's row on one task, one split, against the same attacks.

Each row is one method tuned in one shared regime (``configs/frontier/``); each ``(row, seed)`` run leaves a row
file (accuracy on the held-out split, the membership audit of :class:`~privtune.callbacks.MembershipAudit`, or for a
federated row the run's own audit of its global model, :mod:`privtune.federated.membership`, or for an offsite
row the pipeline's audit of the plug-in model, :mod:`privtune.recipes.offsite_membership`, with the extraction gap
where an emulator is shipped; wall time, bytes, provenance). This module turns the row files into the frontier:
``frontier.json``, ``frontier.md`` (mean ± std over seeds) and ``frontier.png`` (accuracy against the best valid
attack's AUC, with DP-SGD's epsilon rows as the reference line). Torch-free: plain dicts in, JSON / Markdown / PNG out.

Threat model (docs/privacy_audit.md): whoever can query the released model and holds candidate examples tells
members (the training split) from held-out non-members of the same distribution (Yeom et al. 2018; Carlini et al.
2022; Shi et al. 2023); where the cloud sees the token ids of the training stream (shaking), the row also carries
the share of the stream a ciphertext-only decipherment reads. An attack counts only if it is valid: its positive
control (an overfit model, ``benchmarks/results/membership_controls``) excludes AUC 0.5 and the row's own negative
control (non-members against non-members) contains it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEEDS_EXPECTED = 3
CONTROLS = "benchmarks/results/membership_controls/controls.json"
DECIPHER = "benchmarks/results/decipher_shaking/rows"
ATTACK_KEYS = ("auc", "tpr@1%")


@dataclass(frozen=True)
class Row:
    """One method on the frontier.

    Args:
        name: the row's name on the command line and in file names.
        label: how the table names it.
        family: ``baseline``, ``dp_sgd``, ``offsite``, ``federated`` or ``shaking``.
        config: ``configs/frontier/<name>.yaml`` for a row the frontier can run; ``None`` while a hook is missing.
        needs: for a row that cannot run yet, the hook it needs (what the table and the report say).
        epsilon: the DP-SGD target (the reference line of the plot); the client-level DP rows' target is in their
            config and label (a guarantee per client, not per example, so not on DP-SGD's line).
        decipher: the decipherment row file whose token recovery the row carries (shaking rows).
    """

    name: str
    label: str
    family: str
    config: str | None = None
    needs: str = ""
    epsilon: float | None = None
    decipher: str | None = None

    @property
    def runnable(self) -> bool:
        """Whether the frontier script can run this row today."""
        return self.config is not None


ROWS: dict[str, Row] = {
    row.name: row
    for row in (
        Row("zero_shot", "Zero-shot (untuned)", "baseline", "configs/frontier/zero_shot.yaml"),
        Row("lora", "LoRA (r=8), non-private", "baseline", "configs/frontier/lora.yaml"),
        Row("full_ft", "Full fine-tuning, non-private", "baseline", "configs/frontier/full_ft.yaml"),
        Row("dp_sgd_eps1", "DP-SGD ε=1 (LoRA)", "dp_sgd", "configs/frontier/dp_sgd_eps1.yaml", epsilon=1.0),
        Row("dp_sgd_eps3", "DP-SGD ε=3 (LoRA)", "dp_sgd", "configs/frontier/dp_sgd_eps3.yaml", epsilon=3.0),
        Row("dp_sgd_eps8", "DP-SGD ε=8 (LoRA)", "dp_sgd", "configs/frontier/dp_sgd_eps8.yaml", epsilon=8.0),
        # one ScaleOT run yields both rows: OT's 2-13-2 uniform drop is tuned beside it on the same split
        Row(
            "offsite_ot_uniform", "Offsite plug-in, OT uniform drop", "offsite", "configs/frontier/offsite_scaleot.yaml"
        ),
        Row("offsite_scaleot", "Offsite plug-in, ScaleOT", "offsite", "configs/frontier/offsite_scaleot.yaml"),
        Row("offsite_gradot", "Offsite plug-in, GradOT", "offsite", "configs/frontier/offsite_gradot.yaml"),
        Row("fedpeptao", "FedPepTAO (20 clients)", "federated", "configs/frontier/fedpeptao.yaml"),
        Row("fedavg", "FedAvg (20 clients)", "federated", "configs/frontier/fedavg.yaml"),
        Row(
            "fedpeptao_client_dp",
            "FedPepTAO + client-level DP ε=8 (20 clients)",
            "federated",
            "configs/frontier/fedpeptao_client_dp.yaml",
        ),
        Row(
            "fedavg_client_dp",
            "FedAvg + client-level DP ε=8 (20 clients)",
            "federated",
            "configs/frontier/fedavg_client_dp.yaml",
        ),
        Row(
            "shaking_search_key",
            "Shaking, the search's key",
            "shaking",
            "configs/frontier/shaking_search_key.yaml",
            decipher=f"{DECIPHER}/bbc_same_horizontal.json",
        ),
        Row(
            "shaking_hv",
            "Shaking, hv key",
            "shaking",
            "configs/frontier/shaking_hv.yaml",
            decipher=f"{DECIPHER}/bbc_same_hv.json",
        ),
    )
}


def check_rows(names: Sequence[str]) -> list[Row]:
    """The rows named, in the frontier's order; one ``ValueError`` naming every bad or not-yet-runnable row.

    ``all`` stands for every runnable row.
    """
    if not names:
        raise ValueError(f"Name at least one row: {', '.join(ROWS)} (or `all` for the runnable ones).")
    wanted = [r.name for r in ROWS.values() if r.runnable] if list(names) == ["all"] else list(names)
    unknown = [n for n in wanted if n not in ROWS]
    blocked = [n for n in wanted if n in ROWS and not ROWS[n].runnable]
    errors = []
    if unknown:
        errors.append(f"unknown row(s) {unknown}; the rows are {list(ROWS)} (or `all`).")
    if blocked:
        errors.append(
            "not runnable yet: "
            + "; ".join(f"`{n}` needs {ROWS[n].needs}" for n in blocked)
            + f". Runnable rows: {[r.name for r in ROWS.values() if r.runnable]}."
        )
    if errors:
        raise ValueError("--rows: " + " ".join(errors))
    return [ROWS[n] for n in ROWS if n in wanted]


def row_file(out: Path, name: str, seed: int) -> Path:
    """Where the ``(row, seed)`` result lands."""
    return Path(out) / "rows" / f"{name}_seed{seed}.json"


# ---------------------------------------------------------------------------------------------- attacks


def _contains_half(interval: Mapping[str, float]) -> bool:
    return interval["low"] <= 0.5 <= interval["high"]


def attack_validity(report: Mapping[str, Any], controls: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per attack: valid when the controls file's positive control passed and this run's negative control passes.

    Args:
        report: a ``membership_report.json`` (``attacks`` and ``negative_control``).
        controls: ``benchmarks/results/membership_controls/controls.json`` (``verdicts``); ``None`` when it is
            missing, which makes no attack valid (an uncontrolled attack is not used).
    """
    verdicts = (controls or {}).get("verdicts", {})
    out: dict[str, dict[str, Any]] = {}
    for name in report["attacks"]:
        negative = report.get("negative_control", {}).get(name)
        positive = verdicts.get(name, {}).get("positive")
        reasons = []
        if positive is not True:
            reasons.append(
                "positive control failed" if positive is False else f"no positive control for it in {CONTROLS}"
            )
        if negative is None or not _contains_half(negative["auc"]):
            reasons.append("negative control failed (its AUC interval excludes 0.5)" if negative else "no negative")
        out[name] = {"valid": not reasons, "reason": "; ".join(reasons) or "ok"}
    return out


def best_valid(report: Mapping[str, Any], validity: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The valid attack with the highest AUC: its name, AUC and TPR at 1 % FPR with their intervals."""
    names = [n for n, v in validity.items() if v["valid"] and n in report["attacks"]]
    if not names:
        return None
    name = max(names, key=lambda n: report["attacks"][n]["auc"]["value"])
    attack = report["attacks"][name]
    return {"attack": name, **{key: attack[key] for key in ATTACK_KEYS}}


def token_recovery(path: str | Path) -> dict[str, Any]:
    """Best share of the victim's training stream read by a table attack (A3) or the bigram decipherment."""
    data = json.loads(Path(path).read_text())
    best = max(("a3", "bigram"), key=lambda k: data[k]["stream_tokens"])
    return {
        "stream_tokens": data[best]["stream_tokens"],
        "attack": best,
        "public": data.get("public"),
        "key": data.get("key"),
        "file": str(path),
    }


# ---------------------------------------------------------------------------------------------- summary


def _mean_std(values: Iterable[float | None]) -> dict[str, float] | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def load_row_files(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every row file under ``out/rows``, by row name, sorted by seed (files of unknown rows are skipped)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((Path(out) / "rows").glob("*_seed*.json")):
        data = json.loads(path.read_text())
        if data.get("row") in ROWS:
            found.setdefault(data["row"], []).append(data)
    return {k: sorted(v, key=lambda d: d["seed"]) for k, v in found.items()}


def summarise(out: Path, root: Path | None = None) -> dict[str, Any]:
    """The frontier from the row files under ``out``: one entry per row of :data:`ROWS`, run or not.

    Args:
        out: the results folder (``rows/`` inside it).
        root: the repository root the decipherment files are read from (default: the current folder).
    """
    root = Path(root or ".")
    files = load_row_files(out)
    rows = []
    for row in ROWS.values():
        runs = files.get(row.name, [])
        seeds = [r["seed"] for r in runs]
        entry: dict[str, Any] = {"row": row.name, "label": row.label, "family": row.family, "seeds": seeds}
        if not runs:
            entry["status"] = "not yet run" if row.runnable else "not yet run: needs a hook"
            if row.needs:
                entry["needs"] = row.needs
        else:
            entry["status"] = (
                "done" if len(runs) >= SEEDS_EXPECTED else f"partial: {len(runs)} of {SEEDS_EXPECTED} seeds"
            )
            best = [r.get("best_attack") for r in runs]
            entry["accuracy"] = _mean_std(r["accuracy"]["acc"] for r in runs)
            entry["best_attack"] = sorted({b["attack"] for b in best if b})
            entry["auc"] = _mean_std(b["auc"]["value"] if b else None for b in best)
            entry["tpr@1%"] = _mean_std(b["tpr@1%"]["value"] if b else None for b in best)
            entry["auc_intervals"] = [
                [b["auc"]["low"], b["auc"]["high"]] if b else None for b in best
            ]  # per seed, to see whether the leak is measurable
            entry["leak_measurable"] = [bool(b) and not _contains_half(b["auc"]) for b in best]
            entry["wall_seconds"] = _mean_std(r["wall_seconds"] for r in runs)
            entry["cpu_seconds"] = _mean_std(r["cpu_seconds"] for r in runs)
            entry["tuned_bytes"] = runs[0].get("bytes", {}).get("tuned")
            if runs[0].get("bytes", {}).get("communicated"):  # federated rows: up + down over the whole run
                entry["communicated_bytes"] = _mean_std(r["bytes"]["communicated"] for r in runs)
            if runs[0]["accuracy"].get("personalised") is not None:  # federated rows with personal layers
                entry["personalised_accuracy"] = _mean_std(r["accuracy"]["personalised"] for r in runs)
            entry["steps"] = runs[0].get("steps")
            gaps = [(r.get("extraction") or {}).get("gap_points") for r in runs]
            if any(g is not None for g in gaps):  # offsite rows whose emulator is shipped: plug-in − extraction
                entry["extraction_gap_points"] = _mean_std(gaps)
            eps = [r["dp"]["epsilon"] for r in runs if r.get("dp")]
            if eps:
                entry["epsilon"] = _mean_std(eps)
            entry["regime"] = runs[0].get("regime")
            entry["commits"] = sorted({str(r["provenance"].get("commit")) for r in runs})
        if row.epsilon is not None:
            entry["target_epsilon"] = row.epsilon
        if row.decipher:
            path = root / row.decipher
            entry["token_recovery"] = (
                token_recovery(path) | {"file": row.decipher}
                if path.exists()
                else {"file": row.decipher, "missing": True}
            )
        rows.append(entry)
    return {
        "seeds_expected": SEEDS_EXPECTED,
        "controls": CONTROLS,
        "rows": rows,
        "goal": goal_check(rows),
        "cost": total_cost(files),
    }


def total_cost(files: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, float | int]:
    """The CPU and wall seconds of every run behind the row files, each run counted once.

    Rows written by one run (the offsite rows of one ScaleOT run, ``shared_run``) count that run once per seed; an
    implanted shaken model (``implant``, a one-off per key, outside the rows' own seconds) counts once per model.
    """
    runs: dict[tuple[Any, ...], Mapping[str, Any]] = {}
    implants: dict[str, Mapping[str, Any]] = {}
    for name, found in files.items():
        for r in found:
            runs.setdefault((tuple(sorted(r.get("shared_run") or [name])), r["seed"]), r)
            if r.get("implant"):
                implants.setdefault(str(r["implant"].get("model")), r["implant"])
    return {
        "runs": len(runs),
        "cpu_seconds": sum(float(r["cpu_seconds"]) for r in runs.values()),
        "wall_seconds": sum(float(r["wall_seconds"]) for r in runs.values()),
        "implants": len(implants),
        "implant_cpu_seconds": sum(float(i.get("cpu_seconds") or 0.0) for i in implants.values()),
    }


def goal_check(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's goal: a method without formal DP at accuracy >= DP-SGD ε=3's and best AUC <= its (means)."""
    by = {r["row"]: r for r in rows}
    ref = by.get("dp_sgd_eps3", {})
    if not ref.get("accuracy") or not ref.get("auc"):
        return {"decided": False, "why": "the DP-SGD ε=3 row has not run"}
    candidates = [
        r
        for r in rows
        if r["family"] in ("offsite", "federated", "shaking") and "client_dp" not in r["row"] and r.get("auc")
    ]
    met = [
        r["row"]
        for r in candidates
        if r["accuracy"]["mean"] >= ref["accuracy"]["mean"] and r["auc"]["mean"] <= ref["auc"]["mean"]
    ]
    if not candidates:
        return {"decided": False, "why": "no privtune method without formal DP has run yet"}
    return {"decided": True, "met_by": met, "reference": {"acc": ref["accuracy"], "auc": ref["auc"]}}


def _pm(stat: Mapping[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if not stat:
        return "–"
    if stat.get("n", 2) == 1:  # one seed: no spread to show
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def markdown(summary: Mapping[str, Any], provenance: Mapping[str, Any] | None = None) -> str:
    """The frontier table (mean ± std over seeds), the regime, the goal check and the missing hooks."""
    rows = summary["rows"]
    regime = next((r["regime"] for r in rows if r.get("regime")), None)
    lines = ["# Privacy–utility–cost frontier (BBC News, SmolLM2-135M-Instruct)", ""]
    if provenance:
        lines += [
            f"Summary written by: `{provenance.get('command')}`  ",
            f"Commit: `{provenance.get('commit')}`, date {provenance.get('date_utc')}",
            "",
        ]
    if regime:
        lines += [f"Regime (every row): {regime['text']}", ""]
    lines += [
        "Accuracy on the held-out non-members; best valid attack = the valid membership attack with the highest AUC "
        f"(valid: positive control passed in `{summary['controls']}`, the row's own negative control passed); "
        "mean ± std over seeds. Token recovery: best share of the training stream read by a table attack (A3) or "
        "the bigram decipherment, from the cited file.",
        "",
        "| row | status | seeds | accuracy | best valid MIA AUC | TPR @ 1 % FPR | AUC excludes 0.5 (per seed) "
        "| ε | extraction gap (pts) | token recovery | wall s | CPU s | tuned bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = _pm(r["epsilon"], digits=2) if r.get("epsilon") else "–"
        tok = r.get("token_recovery")
        tok_cell = (
            "missing file"
            if tok and tok.get("missing")
            else (f"{100 * tok['stream_tokens']:.1f} % ({tok['attack']}, `{tok['file']}`)" if tok else "–")
        )
        leak = ", ".join("yes" if x else "no" for x in r.get("leak_measurable", [])) or "–"
        attacks = f" ({', '.join(r['best_attack'])})" if r.get("best_attack") else ""
        wall = _pm(r.get("wall_seconds"), digits=0)
        cpu = _pm(r.get("cpu_seconds"), digits=0)
        size = _bytes(r.get("tuned_bytes"))
        if r.get("communicated_bytes"):
            size += f"; {_bytes(r['communicated_bytes']['mean'])} sent (up + down)"
        lines.append(
            f"| {r['label']} | {r['status']} | {len(r['seeds'])} | {_pm(r.get('accuracy'))} "
            f"| {_pm(r.get('auc'))}{attacks} | {_pm(r.get('tpr@1%'))} | {leak} | {eps} "
            f"| {_pm(r.get('extraction_gap_points'), digits=1)} | {tok_cell} "
            f"| {wall} | {cpu} | {size} |"
        )
    lines += [
        "",
        "Federated rows: accuracy and AUC are the global model's (the personalised models' are in the row files); "
        "bytes add what the clients sent and received over the run; the ε of the client-level DP rows bounds what "
        "the global model reveals about a whole client, not about one example. "
        "Offsite rows: accuracy and AUC are the plug-in model's (the data owner's adapters in the original model, "
        "what the model owner deploys; full fine-tuning of the same blocks is audited beside it in the row files); "
        "bytes: the adapters the data owner sends back and the emulator it receives; extraction gap = plug-in − "
        "the data owner's accuracy after fine-tuning every parameter of the shipped emulator, in points (only where "
        "an emulator is shipped: OT's uniform drop holds original blocks and is never exported). "
        "Times: wall and CPU seconds of the whole run (training, audit, accuracy) on a 2-core machine shared with "
        "other jobs; each row file records the load average at its start and end. Token recovery of the search's "
        "key is the permutation-only (horizontal) key's: the vertical operators never touch the ids, so for the id "
        "stream the two keys differ only in their random permutation.",
    ]
    cost = summary.get("cost")
    if cost and cost["runs"]:
        lines += [
            "",
            f"Total cost of the row files so far: {cost['runs']} runs, {cost['cpu_seconds'] / 3600:.2f} CPU hours "
            f"({cost['wall_seconds'] / 3600:.2f} wall hours), plus {cost['implants']} implanted shaken model(s), "
            f"{cost['implant_cpu_seconds'] / 3600:.2f} CPU hours (a run writing two rows counts once).",
        ]
    partial = [r["label"] for r in rows if r["status"].startswith("partial")]
    if partial:
        lines += [
            "",
            f"Fewer than {summary['seeds_expected']} seeds (one seed: no ± shown; otherwise std over the seeds that "
            f"ran): {', '.join(partial)}.",
        ]
    goal = summary["goal"]
    lines += ["", "Goal (a method without formal DP at accuracy ≥ DP-SGD ε=3's and best AUC ≤ its): "]
    if not goal["decided"]:
        lines[-1] += f"not decided yet: {goal['why']}."
    else:
        lines[-1] += f"met by {goal['met_by']}." if goal["met_by"] else "not met by any row that ran."
    needs = [r for r in rows if r.get("needs") and not r["seeds"]]
    if needs:
        lines += ["", "Rows not yet run, and the hook each needs:", ""]
        lines += [f"- {r['label']} (`{r['row']}`): {r['needs']}." for r in needs]
    return "\n".join(lines) + "\n"


def _bytes(n: int | None) -> str:
    if not n:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "–"


def plot(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Accuracy against the best valid attack's AUC; DP-SGD's ε rows joined as the reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in summary["rows"] if r.get("accuracy") and r.get("auc")]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.axvline(0.5, color="grey", lw=0.8, ls=":", label="chance (AUC 0.5)")
    dp = sorted((r for r in done if r["family"] == "dp_sgd"), key=lambda r: r["target_epsilon"])
    if dp:
        ax.plot(
            [r["auc"]["mean"] for r in dp],
            [r["accuracy"]["mean"] for r in dp],
            "-o",
            color="tab:blue",
            label="DP-SGD (ε reference line)",
        )
        for r in dp:
            ax.annotate(f"ε={r['target_epsilon']:g}", (r["auc"]["mean"], r["accuracy"]["mean"]), fontsize=8)
    markers = {"baseline": "s", "offsite": "^", "federated": "D", "shaking": "P"}
    others = [r for r in done if r["family"] != "dp_sgd"]
    for i, r in enumerate(others):
        ax.errorbar(
            r["auc"]["mean"],
            r["accuracy"]["mean"],
            xerr=r["auc"]["std"],
            yerr=r["accuracy"]["std"],
            fmt=markers.get(r["family"], "o"),
            color=plt.get_cmap("tab10")((i + 1) % 10),  # tab:blue is DP-SGD's line
            capsize=3,
            label=r["label"] + ("" if len(r["seeds"]) >= SEEDS_EXPECTED else f" ({len(r['seeds'])} seed)"),
        )
    ax.set_xlabel("best valid membership attack, ROC AUC (lower = more private)")
    ax.set_ylabel("accuracy on held-out examples")
    ax.set_title("Privacy–utility frontier, BBC News, SmolLM2-135M-Instruct", fontsize=10)
    if not done:
        ax.text(0.5, 0.5, "no row has run yet", ha="center", transform=ax.transAxes)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(out: Path, provenance: Mapping[str, Any], root: Path | None = None) -> list[Path]:
    """Regenerate ``frontier.json`` / ``.md`` / ``.png`` in ``out`` from whatever row files exist."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(out, root) | {"provenance": dict(provenance)}
    paths = [out / "frontier.json", out / "frontier.md", out / "frontier.png"]
    paths[0].write_text(json.dumps(summary, indent=1, default=_finite) + "\n")
    paths[1].write_text(markdown(summary, provenance))
    plot(summary, paths[2])
    return paths


def _finite(value: Any) -> Any:  # noqa: ANN401 - json's default hook
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


DOCS_MARKER = "privacy-frontier"


def update_docs(doc: Path, out: Path) -> bool:
    """Replace the ``<!-- privacy-frontier -->`` block of ``doc`` with ``out/frontier.md`` (a generated include).

    Returns whether the text changed. Raises ``ValueError`` if ``doc`` lacks the two markers.
    """
    doc, out = Path(doc), Path(out)
    text = doc.read_text()
    start, end = f"<!-- {DOCS_MARKER} -->", f"<!-- /{DOCS_MARKER} -->"
    if start not in text or end not in text:
        raise ValueError(f"{doc} lacks the `{start}` ... `{end}` markers the frontier table goes between.")
    body = (out / "frontier.md").read_text().split("\n", 1)[1].strip()  # without its title
    rel = out.as_posix()
    marker = f"<!-- result: {rel}/frontier.md, {rel}/rows -->\n"  # the published-figure check's citation
    body = body.replace("\n| row |", f"\n{marker}| row |", 1)
    image = Path(os.path.relpath(out / "frontier.png", doc.parent)).as_posix()  # from the document's folder
    block = (
        f"{start}\nGenerated from `{rel}/frontier.md` by `benchmarks/privacy_frontier.py --docs` (do not edit by "
        f"hand; the row files are in `{rel}/rows/`).\n\n{body}\n\n![frontier]({image})\n{end}"
    )
    new = text.split(start)[0] + block + text.split(end, 1)[1]
    if new != text:
        doc.write_text(new)
    return new != text
