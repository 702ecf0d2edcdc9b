"""Self-adaptive operator settings: a Pareto search over utility, attack success and cost.

CypherTalk (arXiv 2403.07283) reports "reliable accuracy with optimized shaking operator settings" and a
sweep over settings. privtune reads "self-adaptive" as a search (spec §4, a reconstruction):

1. candidates: ``budget`` settings sampled from a :class:`SearchSpace` plus two references, no shaking and
   horizontal only. A candidate is an explicit operator chain with its scales (``KeySetting.chain``), so
   every key drawn from the chosen setting has the chain its trials measured (decision: with a random draw
   per step, one enabled set gives keys of different strength);
2. each candidate runs a short trial per seed (a caller-supplied function: key generation, a short
   implantation, brief tuning) that returns utility ``U`` (higher is better), attack success ``A`` (max
   top-1 recovery over the attacks, lower is better) and cost ``C`` (seconds, lower is better);
3. seeds are averaged; the front is the Pareto set over ``(max U, min A, min C)``;
4. the choice is ``argmax U`` subject to ``A <= tau_attack`` and ``C <= c_max``; if no candidate is feasible,
   the lowest-``A`` point of the front.

Threat model: the search runs on the client (it generates keys); its output, a setting, is not secret,
but the keys drawn during trials are discarded.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from privtune.shaking.key import KeySetting
from privtune.shaking.operators import get_operator, operator_names

#: the main scale of each operator and its default log grid
DEFAULT_GRID: dict[str, tuple[str, tuple[float, ...]]] = {
    "addv": ("kappa", (0.5, 1.0, 2.0)),
    "inflate": ("a", (0.1, 0.2, 0.4)),
    "tilt": ("epsilon", (0.05, 0.1, 0.2)),
    "dx-fixp": ("kappa", (0.25, 0.5, 1.0, 2.0)),
    "gaussian": ("kappa", (0.25, 0.5, 1.0, 2.0)),
    "laplace": ("kappa", (0.25, 0.5, 1.0, 2.0)),
}


@dataclass(frozen=True)
class SearchSpace:
    """Where candidate settings are drawn from.

    Attributes:
        chain_lengths: ``vsn`` values.
        operators: operators a candidate may enable (each candidate enables a random non-empty subset).
        grid: per operator, ``(parameter, values)`` of its main scale.
        pins: pin policies.
        implant_steps: recovery-training budgets.
    """

    chain_lengths: tuple[int, ...] = (1, 2, 3)
    operators: tuple[str, ...] = tuple(DEFAULT_GRID)
    grid: dict[str, tuple[str, tuple[float, ...]]] = field(default_factory=lambda: dict(DEFAULT_GRID))
    pins: tuple[str, ...] = ("special",)
    implant_steps: tuple[int, ...] = (20,)

    def __post_init__(self) -> None:
        for name in self.operators:
            get_operator(name)
            if name not in self.grid:
                raise ValueError(f"Operator {name!r} has no scale grid; `grid` covers {sorted(self.grid)}.")
        if any(n < 0 for n in self.chain_lengths) or not self.chain_lengths:
            raise ValueError(f"`chain_lengths={self.chain_lengths}` must be a non-empty tuple of ints >= 0.")


@dataclass
class Candidate:
    """One point of the search: a key setting (``None`` for no shaking) and an implantation budget."""

    name: str
    setting: KeySetting | None
    implant_steps: int = 0

    def to_dict(self) -> dict:
        """Plain form (the setting's fields, never a key)."""
        return {
            "name": self.name,
            "setting": None if self.setting is None else asdict(self.setting),
            "implant_steps": self.implant_steps,
        }


def sample_candidates(space: SearchSpace, budget: int, seed: int = 0) -> list[Candidate]:
    """``budget`` random settings from ``space`` plus the references ``none`` and ``horizontal``."""
    rng = random.Random(seed)
    out = [Candidate("none", None), Candidate("horizontal", KeySetting(chain_length=0))]
    seen: set[str] = set()
    while len(out) < budget + 2 and len(seen) < 10_000:
        ops = tuple(sorted(rng.sample(space.operators, rng.randint(1, min(2, len(space.operators))))))
        length = rng.choice([n for n in space.chain_lengths if n > 0] or [1])
        chain = tuple(rng.choice(ops) for _ in range(length))
        scales = {op: {space.grid[op][0]: rng.choice(space.grid[op][1])} for op in dict.fromkeys(chain)}
        pin, steps = rng.choice(space.pins), rng.choice(space.implant_steps)
        name = ">".join(chain) + "|" + ",".join(f"{op}.{k}={v:g}" for op, p in scales.items() for k, v in p.items())
        name += f"|pin={pin}|steps={steps}"
        if name in seen:
            seen.add(name + "#")
            continue
        seen.add(name)
        out.append(Candidate(name, KeySetting(chain=chain, scales=scales, pin=pin), steps))
    return out


@dataclass
class TrialResult:
    """Mean utility, attack success and cost of one candidate over its seeds."""

    candidate: Candidate
    utility: float
    attack: float
    cost: float
    per_seed: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:  # noqa: D102
        return {
            **self.candidate.to_dict(),
            "utility": self.utility,
            "attack": self.attack,
            "cost": self.cost,
            "per_seed": self.per_seed,
        }


def pareto_front(results: Sequence[TrialResult]) -> list[int]:
    """Indices of the non-dominated results over ``(max utility, min attack, min cost)``."""

    def dominates(a: TrialResult, b: TrialResult) -> bool:
        no_worse = a.utility >= b.utility and a.attack <= b.attack and a.cost <= b.cost
        better = a.utility > b.utility or a.attack < b.attack or a.cost < b.cost
        return no_worse and better

    return [i for i, r in enumerate(results) if not any(dominates(o, r) for o in results if o is not r)]


def choose(results: Sequence[TrialResult], tau_attack: float, c_max: float = math.inf) -> int:
    """Index of ``argmax U`` subject to ``A <= tau_attack`` and ``C <= c_max``; else the front's lowest ``A``.

    The ``none`` reference (no shaking) is never chosen: it is there to anchor the utility scale.
    """
    eligible = [i for i, r in enumerate(results) if r.candidate.setting is not None] or list(range(len(results)))
    feasible = [i for i in eligible if results[i].attack <= tau_attack and results[i].cost <= c_max]
    if feasible:
        return max(feasible, key=lambda i: (results[i].utility, -results[i].attack, -results[i].cost))
    front = pareto_front([results[i] for i in eligible])
    return min((eligible[i] for i in front), key=lambda i: (results[i].attack, -results[i].utility))


Trial = Callable[[Candidate, int], dict[str, float]]


def run_search(
    trial: Trial,
    candidates: Sequence[Candidate],
    seeds: Sequence[int] = (0, 1),
    tau_attack: float = 0.05,
    c_max: float = math.inf,
) -> dict:
    """Run ``trial(candidate, seed) -> {"utility", "attack", "cost"}`` on every candidate and seed.

    Returns:
        ``{"results": [...], "front": [indices], "choice": index, "tau_attack", "c_max"}``.

    Raises:
        ValueError: if ``tau_attack`` is not in ``[0, 1]`` or ``seeds`` is empty.
    """
    if not 0 <= tau_attack <= 1:
        raise ValueError(f"`tau_attack={tau_attack}` must be a recovery rate in [0, 1].")
    if not seeds:
        raise ValueError("`seeds` must name at least one seed.")
    results = []
    for cand in candidates:
        runs = [dict(trial(cand, s)) for s in seeds]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("utility", "attack", "cost")}
        results.append(TrialResult(cand, mean["utility"], mean["attack"], mean["cost"], runs))
    front = pareto_front(results)
    return {
        "results": results,
        "front": front,
        "choice": choose(results, tau_attack, c_max),
        "tau_attack": tau_attack,
        "c_max": c_max,
    }


def save_search(search: dict, path: str | Path) -> Path:
    """Write the search table, front and choice as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        **search,
        "results": [r.to_dict() for r in search["results"]],
        "c_max": None if math.isinf(search["c_max"]) else search["c_max"],
    }
    path.write_text(json.dumps(data, indent=1))
    return path


def callback_init_args(setting: KeySetting) -> dict:
    """The ``EmbeddingShaking`` init args that reproduce ``setting`` (no key, no seed)."""
    return {
        "operators": list(setting.operators),
        "chain_length": setting.chain_length,
        **({"chain": list(setting.chain)} if setting.chain else {}),
        "scales": {k: dict(v) for k, v in setting.scales.items()},
        "pin": setting.pin,
        "permute": setting.permute,
    }


def write_setting_config(setting: KeySetting, template: str | Path, out: str | Path, comment: str = "") -> Path:
    """Copy a ``train.py`` YAML config, setting its ``EmbeddingShaking`` callback to ``setting``.

    Raises:
        ValueError: if the template has no ``EmbeddingShaking`` callback.
    """
    import yaml  # jsonargparse's dependency; only needed here

    template, out = Path(template), Path(out)
    config = yaml.safe_load(template.read_text())
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    hits = [cb for cb in callbacks if str(cb.get("class_path", "")).endswith("EmbeddingShaking")]
    if not hits:
        raise ValueError(f"`template={template}` has no EmbeddingShaking callback under trainer.callbacks.")
    hits[0].setdefault("init_args", {}).update(callback_init_args(setting))
    out.parent.mkdir(parents=True, exist_ok=True)
    header = [line for line in template.read_text().splitlines()[:2] if line.startswith("#")]
    body = "\n".join([*(f"# {c}" for c in comment.splitlines() if c), *header]) + "\n"
    out.write_text(body + yaml.safe_dump(config, sort_keys=False))
    return out


__all__ = [
    "DEFAULT_GRID",
    "Candidate",
    "SearchSpace",
    "TrialResult",
    "callback_init_args",
    "choose",
    "operator_names",
    "pareto_front",
    "run_search",
    "sample_candidates",
    "save_search",
    "write_setting_config",
]
