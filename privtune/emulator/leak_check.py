"""The leak check by closeness: does an emulator hold an original middle matrix, up to what hides it cheaply?

An emulator artifact must not ship the model owner's middle weights (Offsite-Tuning, arXiv 2302.04870;
ScaleOT, arXiv 2412.09812). Comparing bytes is not enough: a copy scaled by ``1 + 1e-6``, rounded through
bfloat16, negated, transposed, with 1e-9 noise or with its columns permuted has other bytes and the same
information. This module measures, for every matrix ``E`` of the emulator and every original middle matrix
``W`` of the same shape or of the transposed shape, the **relative Frobenius error after the best alignment**:

* rows matched: each row ``e_i`` of ``E`` is paired with the row of ``W`` (or of ``Wᵀ``) it is most parallel
  to, and given its own best scale and sign; the error is
  ``sqrt(Σ_i ‖e_i‖² (1 - cos²(e_i, w_π(i)))) / ‖E‖``, i.e. ``min ‖E - D P W‖ / ‖E‖`` over a row matching
  ``P`` (not required to be one-to-one) and a diagonal ``D``. The identity matching with one scale is a special
  case, so this bounds the plain "best least-squares scalar" error from below;
* columns matched: the same on ``Eᵀ``;
* the plain error after the best scalar ``c`` (``min_c ‖E - c W‖ / ‖E‖ = sqrt(1 - cos²(E, W))``), reported
  for every same-shape pair.

The export is refused when any error is below ``min_rel_error`` (default :data:`DEFAULT_MIN_REL_ERROR`,
``1e-2``). ScaleOT's designed compression stays above it: on SmolLM2-135M the truncated SVD at ``β = 0.8``
(attention) and ``β = 0.9`` (MLP) leaves every middle matrix at a relative error of at least 0.019
(``docs/offsite_tuning.md``, "The leak check"). Factored layers (``*.down.weight`` / ``*.up.weight``, e.g.
:class:`~privtune.emulator.low_rank.LowRankLinear`) are also checked as their product ``up @ down``.

Cost: rows are matched through a fixed Gaussian sketch (``sketch_dim`` numbers per row; exact cosines when
rows are shorter), after a screen that compares the largest rows of ``E`` with every row of every candidate
(the sketch keeps a near-copy's rows at cosine ≈ 1 and unrelated rows near 0). The exact error is then
computed on the matched rows. Vectorised torch; a SmolLM2 ScaleOT emulator is checked in seconds on CPU.

Not searched (documented limits): a simultaneous row *and* column permutation, general rotations
``U W V``, sums of several originals, and one-dimensional tensors (norm gains, biases: ``O(d)`` numbers per
block). Threat model: the data owner unpacks the emulator and looks for the owner's middle weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from privtune.emulator.harmonizer import LayerSwitch
from privtune.emulator.plan import EmulatorPlan
from privtune.models import get_blocks, unwrap

#: Refuse an emulator matrix whose relative error to an aligned original is below this.
DEFAULT_MIN_REL_ERROR = 1e-2
_SKETCH_SEED = 20240229
_EPS = 1e-30


class OriginalTensorError(ValueError):
    """An emulator holds a tensor of the original middle blocks (or a near copy of one)."""


@dataclass(frozen=True)
class Closeness:
    """How close one emulator matrix comes to its nearest original middle matrix.

    Attributes:
        tensor: the emulator tensor's name (a factored pair is named ``<prefix>.(up@down)``).
        original: ``layers.<original block index>.<parameter name>``.
        rel_error: the smallest relative Frobenius error over the alignments tried.
        cosine: ``|cos|`` between the two matrices after that alignment (``sqrt(1 - rel_error²)``).
        alignment: ``rows``, ``columns``, ``scale`` (same layout, one scalar), each on ``W`` or on ``Wᵀ``
            (``transposed rows`` ...).
    """

    tensor: str
    original: str
    rel_error: float
    cosine: float
    alignment: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _as_matrix(tensor: Tensor) -> Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32).reshape(tensor.shape[0], -1)


def _informative(tensor: Tensor) -> bool:
    """A 2-D+ tensor whose entries are not all equal (a constant matrix carries no weight information)."""
    return tensor.dim() >= 2 and tensor.numel() > 1 and not bool((tensor == tensor.reshape(-1)[0]).all())


def emulator_matrices(state: Mapping[str, Tensor], shapes: set[tuple[int, ...]] | None = None) -> dict[str, Tensor]:
    """The matrices of an emulator state dict that the check compares (float32, CPU, 2-D).

    Every informative 2-D+ tensor, plus the product ``up @ down`` of each factored pair
    ``<prefix>.down.weight`` / ``<prefix>.up.weight`` (a rank-``r`` layer whose product is the matrix it
    applies). With ``shapes``, only matrices of those 2-D shapes (the others have nothing to be compared with).
    """

    def wanted(t: Tensor) -> bool:
        return shapes is None or (t.shape[0], t[0].numel()) in shapes

    out = {name: _as_matrix(t) for name, t in state.items() if t.dim() >= 2 and wanted(t) and _informative(t)}
    for name, down in state.items():
        if not name.endswith(".down.weight"):
            continue
        up = state.get(name[: -len("down.weight")] + "up.weight")
        if up is not None and up.dim() == 2 and down.dim() == 2 and up.shape[1] == down.shape[0]:
            product = _as_matrix(up) @ _as_matrix(down)
            if wanted(product) and _informative(product):
                out[name[: -len(".down.weight")] + ".(up@down)"] = product
    return out


def original_middle_matrices(original: nn.Module, plan: EmulatorPlan) -> dict[str, Tensor]:
    """``{"layers.<i>.<param>": matrix}`` of every informative 2-D+ tensor of the original middle blocks.

    Stage-1 models hold :class:`~privtune.emulator.harmonizer.LayerSwitch` wrappers: only the original block
    inside is read, never its harmonizer.
    """
    blocks = [b.block if isinstance(b, LayerSwitch) else b for b in get_blocks(unwrap(original))]
    if len(blocks) != plan.num_layers:
        raise ValueError(f"The plan is for {plan.num_layers} blocks but the original model has {len(blocks)}.")
    out = {}
    for idx in plan.split.middle_indices:
        for name, tensor in blocks[idx].state_dict().items():
            if _informative(tensor):
                out[f"layers.{idx}.{name}"] = _as_matrix(tensor)
    return out


def _sketch(length: int, dim: int) -> Tensor | None:
    """A fixed ``[length, dim]`` Gaussian projection, or ``None`` when rows are short enough to compare exactly."""
    if length <= dim:
        return None
    gen = torch.Generator().manual_seed(_SKETCH_SEED + length)
    return torch.randn(length, dim, generator=gen) / dim**0.5


def _unit_rows(matrix: Tensor) -> Tensor:
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(_EPS)


def _sketched_unit(matrix: Tensor, sketch: Tensor | None) -> Tensor:
    """Unit-norm rows of ``matrix @ sketch`` (cosines are scale-free, so the rows need no normalising first)."""
    return _unit_rows(matrix if sketch is None else matrix @ sketch)


def _matched_error(
    rows: Tensor, norms: Tensor, rows_sketch: Tensor, candidate: Tensor, cand_norms: Tensor, cand_sketch: Tensor
) -> tuple[float, float]:
    """Error and ``|cos|`` of ``rows`` against ``candidate`` after matching each row to its most parallel row."""
    partner = (rows_sketch @ cand_sketch.T).abs().argmax(dim=1)
    # float64 for the error itself: 1 - cos² of near-parallel rows loses digits in float32.
    dots = (rows.double() * candidate[partner].double()).sum(dim=1)
    cos = dots / (norms.double() * cand_norms[partner].double()).clamp_min(_EPS)
    weight = norms.double().square()
    err2 = float((weight * (1.0 - cos.square()).clamp_min(0.0)).sum() / weight.sum().clamp_min(_EPS))
    return err2**0.5, max(0.0, 1.0 - err2) ** 0.5


@dataclass
class _Family:
    """Vectors of one length and count from several originals: rows of ``W`` or rows of ``Wᵀ`` (columns of ``W``)."""

    names: list[str]
    transposed: list[bool]
    vectors: list[Tensor]
    norms: list[Tensor]
    sketched: Tensor  # [p, count, k] unit sketches


def _groups(items: Mapping[str, Tensor]) -> dict[tuple[int, ...], list[str]]:
    out: dict[tuple[int, ...], list[str]] = {}
    for name, t in items.items():
        out.setdefault(tuple(t.shape), []).append(name)
    return out


def nearest_originals(
    emulator: Mapping[str, Tensor],
    originals: Mapping[str, Tensor],
    sketch_dim: int = 64,
    screen_rows: int = 16,
    screen_cosine: float = 0.8,
    chunk: int = 8,
) -> dict[str, Closeness]:
    """For each emulator matrix, its nearest original matrix of the same or the transposed shape.

    Args:
        emulator: ``{name: 2-D float matrix}`` (see :func:`emulator_matrices`).
        originals: ``{name: 2-D float matrix}`` (see :func:`original_middle_matrices`).
        sketch_dim: sketch width used to match rows (rows no longer than this are compared exactly).
        screen_rows: rows of ``E`` (the largest) compared with every candidate row before the full matching.
        screen_cosine: a candidate is matched in full when the median, over the screened rows, of their best
            sketched ``|cos|`` exceeds this; unrelated rows stay near ``1/sqrt(sketch_dim)``, a near copy's at 1.
        chunk: emulator matrices screened together (bounds the screen's memory).

    Returns:
        ``{emulator name: Closeness}`` for every emulator matrix that shares a shape (or transposed shape) with
        an original; the smallest error over every candidate and alignment.
    """
    sketches: dict[int, Tensor | None] = {}

    def sketch_for(length: int) -> Tensor | None:
        if length not in sketches:
            sketches[length] = _sketch(length, sketch_dim)
        return sketches[length]

    best: dict[str, Closeness] = {}

    def offer(candidate: Closeness) -> None:
        if candidate.tensor not in best or candidate.rel_error < best[candidate.tensor].rel_error:
            best[candidate.tensor] = candidate

    # Error after the best scalar, same layout: one product per shape.
    original_groups = _groups(originals)
    for shape, enames in _groups(emulator).items():
        onames = original_groups.get(shape)
        if not onames:
            continue
        flat = torch.stack([originals[n].reshape(-1) for n in onames])
        flat = flat / flat.norm(dim=1, keepdim=True).clamp_min(_EPS)
        mine = torch.stack([emulator[n].reshape(-1) for n in enames])
        cos = (mine @ flat.T).abs() / mine.norm(dim=1, keepdim=True).clamp_min(_EPS)  # [q, p]
        for ename, i in zip(enames, cos.argmax(dim=1).tolist()):
            e, w = emulator[ename].double(), originals[onames[i]].double()  # the chosen pair, in float64
            c = min(1.0, float((e * w).sum().abs() / (e.norm() * w.norm()).clamp_min(_EPS)))
            offer(Closeness(ename, onames[i], max(0.0, 1.0 - c * c) ** 0.5, c, "scale"))
    # Row matching: rows of E against rows of W or of Wᵀ of the same shape, then the same on Eᵀ (columns).
    views = [(f"{n}|rows", e) for n, e in emulator.items()] + [(f"{n}|columns", e.T) for n, e in emulator.items()]
    view_groups = _groups(dict(views))
    matrices = dict(views)
    for vshape, vnames in view_groups.items():
        names, flags, vectors = [], [], []
        for oname, w in originals.items():
            for transposed, vecs in ((False, w), (True, w.T)):
                if tuple(vecs.shape) == vshape:
                    names.append(oname)
                    flags.append(transposed)
                    vectors.append(vecs)
        if not names:
            continue
        sk = sketch_for(vshape[1])
        family = _Family(
            names,
            flags,
            vectors,
            [v.norm(dim=1) for v in vectors],
            torch.stack([_sketched_unit(v, sk) for v in vectors]),
        )
        p, m, k = family.sketched.shape
        flat_family = family.sketched.reshape(p * m, k)
        for start in range(0, len(vnames), chunk):
            batch = vnames[start : start + chunk]
            vecs = [matrices[v] for v in batch]
            norms = [v.norm(dim=1) for v in vecs]
            vs = [_sketched_unit(v, sk) for v in vecs]
            top = min(screen_rows, vshape[0])
            probes = torch.cat([s[n.argsort(descending=True)[:top]] for s, n in zip(vs, norms)])  # [b*top, k]
            screen = (probes @ flat_family.T).abs().reshape(len(batch), top, p, m).amax(dim=3).median(dim=1).values
            for i, j in torch.nonzero(screen >= screen_cosine).tolist():
                ename, _, side = batch[i].rpartition("|")
                err, cosine = _matched_error(
                    vecs[i], norms[i], vs[i], family.vectors[j], family.norms[j], family.sketched[j]
                )
                # Columns of E against rows of W is the transposed alignment; against rows of Wᵀ, the plain one.
                transposed = family.transposed[j] != (side == "columns")
                offer(Closeness(ename, family.names[j], err, cosine, f"{'transposed ' if transposed else ''}{side}"))
    return {name: best[name] for name in emulator if name in best}


def check_no_original(
    emulator_state: Mapping[str, Tensor],
    original: nn.Module,
    plan: EmulatorPlan,
    min_rel_error: float = DEFAULT_MIN_REL_ERROR,
) -> dict[str, Closeness]:
    """Refuse an emulator that holds an original middle matrix or a close variant of one.

    Returns:
        The nearest original of every checked emulator matrix (for the artifact summary).

    Raises:
        OriginalTensorError: naming each emulator tensor below ``min_rel_error``, the original it matches, the
            alignment and the error.
        ValueError: if ``min_rel_error`` is not in ``(0, 1)``.
    """
    if not 0.0 < min_rel_error < 1.0:
        raise ValueError(f"`min_rel_error={min_rel_error}` must be in (0, 1).")
    originals = original_middle_matrices(original, plan)
    shapes = {tuple(w.shape) for w in originals.values()} | {tuple(w.shape[::-1]) for w in originals.values()}
    near = nearest_originals(emulator_matrices(emulator_state, shapes), originals)
    hits = sorted((c for c in near.values() if c.rel_error < min_rel_error), key=lambda c: c.rel_error)
    if hits:
        listed = "; ".join(
            f"`{c.tensor}` matches original `{c.original}` ({c.alignment}) at relative error {c.rel_error:.2e}"
            for c in hits[:5]
        )
        more = f" (and {len(hits) - 5} more)" if len(hits) > 5 else ""
        raise OriginalTensorError(
            f"The emulator holds {len(hits)} tensor(s) within relative error {min_rel_error:g} of an original "
            f"middle matrix, refusing to export: {listed}{more}. HINT: compress every kept block below full rank "
            "(ScaleOT `beta` < 1 and `beta_mlp` < 1 whose rounded rank is below min(shape), or GradOT budgets < 1), "
            "or distil the emulator; see docs/offsite_tuning.md, 'The leak check'."
        )
    return near


def kept_matrix_closeness(emulator: nn.Module, original: nn.Module, plan: EmulatorPlan) -> dict[str, dict[str, Any]]:
    """Per matrix of each kept block: relative error and cosine to the original matrix it came from.

    ``rel_error = ‖E - W‖ / ‖W‖`` and ``cosine = <E, W> / (‖E‖ ‖W‖)`` in the same layout, a factored layer
    compared as its product. This is how much of each kept original matrix the data owner receives.

    Returns:
        ``{"<emulator position>.<module path>": {"original": "layers.<i>.<path>", "rel_error", "cosine"}}``.
    """
    originals = [b.block if isinstance(b, LayerSwitch) else b for b in get_blocks(unwrap(original))]
    kept = get_blocks(unwrap(emulator))
    out: dict[str, dict[str, Any]] = {}
    for pos, (orig, kind) in enumerate(zip(plan.layer_map, plan.kinds)):
        if kind != "block":
            continue
        mine = emulator_matrices(kept[pos].state_dict())
        for name, w in originals[orig].state_dict().items():
            if not name.endswith("weight") or w.dim() != 2:
                continue
            module = name[: -len(".weight")]
            e = mine.get(name, mine.get(f"{module}.(up@down)"))
            w2 = _as_matrix(w)
            if e is None or e.shape != w2.shape:
                continue
            rel = float((e - w2).norm() / w2.norm().clamp_min(_EPS))
            cos = float((e * w2).sum() / (e.norm() * w2.norm()).clamp_min(_EPS))
            out[f"{pos}.{module}"] = {"original": f"layers.{orig}.{module}", "rel_error": rel, "cosine": cos}
    return out
