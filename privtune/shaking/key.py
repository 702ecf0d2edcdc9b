"""The CypherTalk shaking key: a vertical operator chain and a horizontal vocabulary permutation.

CypherTalk (arXiv 2403.07283) keys a model with ``vskey = {vsn, vsops[], vsopts[]}`` (a chain of vertical
operators) and ``hskey`` (a permutation ``pi`` of the vocabulary). A :class:`ShakeKey` stores only a 128-bit
secret seed and the plain chain/configuration: every tensor (operator states, ``pi``, ``pi^-1``) is
regenerated from seeds derived from it, so a key file is a few hundred bytes and regenerates identical
tensors everywhere.

Threat model: the key is the data owner's secret against an honest-but-curious cloud. It lives only on the
client; ``repr`` and :meth:`ShakeKey.describe` never show the seed, and a :meth:`ShakeKey.fingerprint`
(a hash that reveals nothing about the 128-bit seed) is what logs and checkpoints may carry.

Client-side mapping (spec §2.2): encode ``ids_s = pi[ids]``, decode ``ids = pi^-1[ids_s]``, logits back to
the plain order ``logits = logits_s[..., pi]``, LM labels ``pi[labels]`` with ``-100`` kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from privtune.shaking.operators import TableStats, get_operator, operator_names

KEY_VERSION = 1
Pin = Literal["special", "none"]
NoiseMode = Literal["fixed"]
_PINS = ("special", "none")
#: independent tensor streams of one key: the input embedding's and an untied LM head's
Stream = Literal["embedding", "head"]
STREAMS = ("embedding", "head")


def _derive_seed(secret: str, label: str) -> int:
    """A 63-bit generator seed derived from the secret and a label (independent streams per use)."""
    digest = hashlib.sha256(f"{secret}:{label}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class OpStep:
    """One step of the vertical chain: an operator name and its full scalar parameters."""

    name: str
    params: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", get_operator(self.name).validate(dict(self.params)))


@dataclass(frozen=True)
class KeySetting:
    """What a key is drawn from (the operator setting that :mod:`privtune.shaking.search` tunes).

    Attributes:
        operators: the enabled operator set; each chain step draws one uniformly (spec §2.1).
        chain_length: ``vsn``, the number of vertical steps (0: horizontal only); default 1, or ``len(chain)``.
        chain: an explicit operator sequence ``op_1, ..., op_n`` (applied in this order). When given, every key
            drawn from the setting has this chain and only its tensors are random; ``operators`` becomes the
            chain's distinct names. The operator-setting search uses it (decision): with random draws one
            setting gives keys of different strength (``{dx-fixp, tilt}``, one step, is sometimes a tilt
            that hides nothing), so a trial's attack figure would not hold for the key a user then draws.
        scales: per-operator parameter overrides, e.g. ``{"gaussian": {"kappa": 0.3}}``.
        permute: whether to draw a horizontal permutation (``False``: identity, vertical only).
        pin: ``special`` keeps special-token ids fixed under ``pi`` (anchors for an attacker, but stop and
            pad tokens need no mapping); ``none`` permutes every id.
        noise_mode: only ``fixed`` (noise baked into the table, invertible). Fresh per-occurrence noise needs
            client-side embedding (the SnD protocol) and is not part of shaking.
    """

    operators: tuple[str, ...] = ("gaussian",)
    chain_length: int | None = None
    scales: dict[str, dict[str, float]] = field(default_factory=dict)
    permute: bool = True
    pin: str = "special"
    noise_mode: str = "fixed"
    chain: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "chain", tuple(self.chain))
        if self.chain:
            if self.chain_length is not None and self.chain_length != len(self.chain):
                raise ValueError(
                    f"`chain_length={self.chain_length}` disagrees with `chain={list(self.chain)}` "
                    f"({len(self.chain)} steps); give one of them."
                )
            object.__setattr__(self, "chain_length", len(self.chain))
            object.__setattr__(self, "operators", tuple(dict.fromkeys(self.chain)))
        elif self.chain_length is None:
            object.__setattr__(self, "chain_length", 1)
        object.__setattr__(self, "operators", tuple(self.operators))
        for name in (*self.operators, *self.scales):
            get_operator(name)  # raises on an unknown name
        for name, params in self.scales.items():
            get_operator(name).validate(dict(params))
        if self.chain_length < 0:
            raise ValueError(f"`chain_length={self.chain_length}` must be >= 0.")
        if self.chain_length > 0 and not self.operators:
            raise ValueError(f"`chain_length={self.chain_length}` needs a non-empty `operators` set.")
        if self.pin not in _PINS:
            raise ValueError(f"`pin={self.pin!r}` is not allowed; allowed: {', '.join(_PINS)}.")
        if self.noise_mode != "fixed":
            raise ValueError(
                f"`noise_mode={self.noise_mode!r}` is not supported; allowed: 'fixed'. HINT: fresh per-occurrence "
                "noise needs client-side embedding (Split-and-Denoise), which the cloud-embeds-ids protocol excludes."
            )


class ShakeKey:
    """A shaking key: seed, vertical chain, permutation settings and the table it is bound to.

    Build one with :meth:`generate`; save with :meth:`save` and load with :meth:`load`. Tensors are derived
    lazily and cached: :attr:`perm` (``pi``), :attr:`inv_perm` (``pi^-1``) and :meth:`op_state`.
    """

    def __init__(
        self,
        *,
        secret: str,
        ops: Sequence[OpStep],
        vocab_size: int,
        dim: int,
        stats: TableStats,
        pinned: Iterable[int] = (),
        pin: str = "special",
        permute: bool = True,
        noise_mode: str = "fixed",
        version: int = KEY_VERSION,
    ) -> None:
        if version != KEY_VERSION:
            raise ValueError(f"Shaking key `version={version}` is not supported; this privtune reads {KEY_VERSION}.")
        if vocab_size < 2 or dim < 1:
            raise ValueError(f"`vocab_size={vocab_size}` and `dim={dim}` must be >= 2 and >= 1.")
        if pin not in _PINS:
            raise ValueError(f"`pin={pin!r}` is not allowed; allowed: {', '.join(_PINS)}.")
        self._secret = secret
        self.ops = tuple(ops)
        self.vocab_size = int(vocab_size)
        self.dim = int(dim)
        self.stats = stats
        self.pinned = tuple(sorted({int(i) for i in pinned})) if pin == "special" else ()
        bad = [i for i in self.pinned if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Pinned ids {bad} are outside the vocabulary [0, {self.vocab_size}).")
        self.pin = pin
        self.permute = bool(permute)
        self.noise_mode = noise_mode
        self.version = version
        self._perm: Tensor | None = None
        self._inv: Tensor | None = None
        self._states: dict[tuple[int, str], Tensor] = {}

    # ------------------------------------------------------------------ generation and serialisation
    @classmethod
    def generate(
        cls,
        setting: KeySetting,
        table: Tensor,
        *,
        pinned: Iterable[int] = (),
        seed: int | str | None = None,
    ) -> ShakeKey:
        """Draw a key for the original input table ``table`` ``[V, d]`` (client side).

        Args:
            setting: the operator setting.
            table: the original (public) input embedding; only its shape and scale statistics are kept.
            pinned: special-token ids kept fixed when ``setting.pin == "special"``.
            seed: the secret; ``None`` draws 128 bits from the OS (``secrets``). Pass one only in tests.
        """
        secret = f"{secrets.randbits(128):032x}" if seed is None else str(seed)
        vocab_size, dim = table.shape
        chooser = torch.Generator().manual_seed(_derive_seed(secret, "chain"))
        ops = []
        for step in range(setting.chain_length):
            if setting.chain:
                name = setting.chain[step]
            else:
                name = setting.operators[int(torch.randint(len(setting.operators), (1,), generator=chooser))]
            ops.append(OpStep(name, dict(setting.scales.get(name, {}))))
        return cls(
            secret=secret,
            ops=ops,
            vocab_size=vocab_size,
            dim=dim,
            stats=TableStats.of(table),
            pinned=pinned,
            pin=setting.pin,
            permute=setting.permute,
            noise_mode=setting.noise_mode,
        )

    def to_dict(self) -> dict:
        """Plain serialisable form (holds the secret seed: client side only)."""
        return {
            "version": self.version,
            "seed": self._secret,
            "ops": [{"name": s.name, "params": dict(s.params)} for s in self.ops],
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "stats": {"std": self.stats.std, "mean_row_norm": self.stats.mean_row_norm},
            "pin": self.pin,
            "pinned": list(self.pinned),
            "permute": self.permute,
            "noise_mode": self.noise_mode,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ShakeKey:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: for a missing field, an unknown operator or an unsupported version.
        """
        required = {"version", "seed", "ops", "vocab_size", "dim", "stats"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"Not a shaking key: fields {missing} are missing.")
        return cls(
            secret=str(data["seed"]),
            ops=[OpStep(op["name"], dict(op.get("params", {}))) for op in data["ops"]],
            vocab_size=int(data["vocab_size"]),
            dim=int(data["dim"]),
            stats=TableStats(float(data["stats"]["std"]), float(data["stats"]["mean_row_norm"])),
            pinned=data.get("pinned", ()),
            pin=data.get("pin", "special"),
            permute=bool(data.get("permute", True)),
            noise_mode=data.get("noise_mode", "fixed"),
            version=int(data["version"]),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the key as JSON, readable by the owner only (mode 0600)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=1)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, vocab_size: int | None = None, dim: int | None = None) -> ShakeKey:
        """Read a key file; when ``vocab_size``/``dim`` are given, check the key was made for that table.

        Raises:
            FileNotFoundError: if the file does not exist.
            ValueError: if the file is not a key, or was made for another vocabulary size or width.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"`{path}` is not a shaking key file (not JSON: {err.msg}).") from None
        key = cls.from_dict(data)
        key.check_table(vocab_size, dim, source=str(path))
        return key

    def check_table(self, vocab_size: int | None, dim: int | None, *, source: str = "the key") -> None:
        """Raise ``ValueError`` unless the key fits a ``[vocab_size, dim]`` table (``None`` skips a check)."""
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(
                f"{source} was made for a vocabulary of {self.vocab_size} ids, but the model's embedding has "
                f"{vocab_size} rows. HINT: generate a key for this model."
            )
        if dim is not None and dim != self.dim:
            raise ValueError(f"{source} was made for embedding width {self.dim}, but the model's is {dim}.")

    # ------------------------------------------------------------------ identity without the secret
    def fingerprint(self) -> str:
        """16 hex digits identifying the key (safe to log: a hash of the 128-bit secret and the config)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(b"privtune-shaking-key:" + blob).hexdigest()[:16]

    def describe(self) -> dict:
        """Non-secret summary: chain structure, sizes, pin and fingerprint (no seed)."""
        return {
            "fingerprint": self.fingerprint(),
            "ops": [s.name for s in self.ops],
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "pin": self.pin,
            "permute": self.permute,
        }

    def __repr__(self) -> str:
        return f"ShakeKey({self.describe()})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShakeKey) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.fingerprint())

    # ------------------------------------------------------------------ derived tensors
    @property
    def is_vertical(self) -> bool:
        """Whether the key has a non-empty vertical chain."""
        return bool(self.ops)

    @property
    def is_identity(self) -> bool:
        """Whether the key changes nothing: no vertical step and ``pi`` the identity (the cloud sees plain ids)."""
        return not self.ops and bool(torch.equal(self.perm, torch.arange(self.vocab_size)))

    @property
    def invertible(self) -> bool:
        """Whether every vertical step can be undone exactly (all can with fixed noise)."""
        return all(get_operator(s.name).invertible for s in self.ops)

    @property
    def perm(self) -> Tensor:
        """``pi`` as a LongTensor ``[V]``: plain id ``t`` becomes shaken id ``pi[t]``; pinned ids map to themselves."""
        if self._perm is None:
            perm = torch.arange(self.vocab_size)
            if self.permute:
                pinned = torch.zeros(self.vocab_size, dtype=torch.bool)
                pinned[list(self.pinned)] = True
                free = torch.nonzero(~pinned).squeeze(1)  # ids that move
                gen = torch.Generator().manual_seed(_derive_seed(self._secret, "perm"))
                perm[free] = free[torch.randperm(free.numel(), generator=gen)]
            self._perm = perm
            self._inv = torch.empty_like(perm)
            self._inv[perm] = torch.arange(self.vocab_size)
        return self._perm

    @property
    def inv_perm(self) -> Tensor:
        """``pi^-1`` as a LongTensor ``[V]``."""
        _ = self.perm
        assert self._inv is not None
        return self._inv

    def op_state(self, index: int, stream: Stream = "embedding") -> Tensor:
        """The float64 key tensor of chain step ``index`` (regenerated from the seed, then cached).

        ``stream="head"`` draws an independent tensor of the same operator for an untied LM head. Sharing the
        embedding's noise would let the cloud cancel it: ``E_s - W_s = (E - W)[pi^-1]`` for additive noise,
        which table matching against the public ``E - W`` undoes.
        """
        if stream not in STREAMS:
            raise ValueError(f"`stream={stream!r}` is not a key stream; allowed: {', '.join(STREAMS)}.")
        if (index, stream) not in self._states:
            step = self.ops[index]
            label = f"op{index}:{step.name}" if stream == "embedding" else f"{stream}:op{index}:{step.name}"
            gen = torch.Generator().manual_seed(_derive_seed(self._secret, label))
            op = get_operator(step.name)
            self._states[(index, stream)] = op.draw(gen, (self.vocab_size, self.dim), self.stats, step.params)
        return self._states[(index, stream)]

    def clear_cache(self) -> None:
        """Drop the cached tensors (operator noise can be ``V x d`` float64 per step)."""
        self._states.clear()

    # ------------------------------------------------------------------ client-side id mapping
    def encode_ids(self, ids: Tensor) -> Tensor:
        """Plain ids to shaken ids: ``pi[ids]``; negative ids (``-100`` ignore labels) are kept."""
        perm = self.perm.to(ids.device)
        return torch.where(ids >= 0, perm[ids.clamp_min(0)], ids)

    def decode_ids(self, ids: Tensor) -> Tensor:
        """Shaken ids to plain ids: ``pi^-1[ids]``; negative ids are kept."""
        inv = self.inv_perm.to(ids.device)
        return torch.where(ids >= 0, inv[ids.clamp_min(0)], ids)

    def plain_logits(self, logits: Tensor) -> Tensor:
        """Shaken-space logits ``[..., V]`` back to the plain vocabulary order: ``logits[..., pi]``."""
        return logits.index_select(-1, self.perm.to(logits.device))


KEY_OPTIONS = ("operators", "chain_length", "chain", "scales", "permute", "pin")


def compare_key_options(key: ShakeKey, given: dict[str, Any], *, source: str = "the key file") -> list[str]:
    """Check the key-drawing options a user gave against an existing key; returns the options it ignores.

    A key file, once it exists, decides the key: the options only draw new keys. An option that contradicts the
    file (``permute: false`` against a permuting key, another chain, another scale...) is an error, since the
    run would not be protected the way its config says. An option that the file cannot confirm (an operator
    or a scale that the key's chain does not use) is returned, so the caller can name it in a warning.

    Args:
        key: the existing key.
        given: the options the user set explicitly (names in :data:`KEY_OPTIONS`; unset ones left out).
        source: how to name the key in messages (e.g. ``"`key_path='k.json'`"``).

    Raises:
        ValueError: naming every conflicting option, its configured value and the key file's value.
    """
    unknown = sorted(set(given) - set(KEY_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown key option(s) {unknown}; allowed: {', '.join(KEY_OPTIONS)}.")
    names = [s.name for s in key.ops]
    conflicts: list[str] = []
    ignored: list[str] = []

    def clash(option: str, configured: Any, held: Any) -> None:
        conflicts.append(f"`{option}={configured!r}` (the file has {held!r})")

    if "chain_length" in given and given["chain_length"] != len(names):
        clash("chain_length", given["chain_length"], len(names))
    if "chain" in given and given["chain"] and list(given["chain"]) != names:
        clash("chain", list(given["chain"]), names)
    if "operators" in given:
        operators = list(given["operators"])
        if not set(names) <= set(operators):
            clash("operators", operators, sorted(set(names)))
        elif set(operators) - set(names):
            ignored.append(f"operators {sorted(set(operators) - set(names))} (not in the key's chain {names})")
    if "permute" in given and bool(given["permute"]) != key.permute:
        clash("permute", bool(given["permute"]), key.permute)
    if "pin" in given and given["pin"] != key.pin:
        clash("pin", given["pin"], key.pin)
    for op, params in (given.get("scales") or {}).items():
        steps = [s for s in key.ops if s.name == op]
        if not steps:
            ignored.append(f"scales.{op} (no {op} step in the key's chain {names})")
            continue
        operator = get_operator(op)
        wanted = operator.validate(dict(params))
        for param in params:
            held = [operator.validate(dict(step.params))[param] for step in steps]
            if any(abs(h - wanted[param]) > 1e-12 * max(1.0, abs(h)) for h in held):
                clash(f"scales.{op}.{param}", wanted[param], held[0] if len(set(held)) == 1 else held)
    if conflicts:
        raise ValueError(
            f"{source} holds a key that contradicts the configured key option(s): {'; '.join(conflicts)}. The key "
            "file decides the key once it exists. HINT: remove these options (or set them to the file's values), "
            "or point `key_path` at a new file to draw a key from them."
        )
    return ignored


def available_operators() -> list[str]:
    """Names of the operators a :class:`KeySetting` may enable."""
    return operator_names()
