"""Server-side aggregation math for FedLD and its baselines: pure functions over ``{name: ndarray}`` dicts.

Every function here takes client *deltas* (``local - global``, one ``{state_dict key: ndarray}`` per
client, every state entry including BatchNorm buffers) and returns one ``{key: ndarray}`` update that
the server adds to the global model (server learning rate 1, as in the official code). Nothing here
knows about Flower or torch; the Flower strategies import these functions.

Functions
---------
- :func:`principal_gradient_aggregate` -- FedLD's principal-gradient aggregation (brief section 1.3).
- :func:`gradient_harmonize` -- FedGH's hierarchical pairwise gradient harmonisation, transcribed from
  the official repo's ``svd_tools.pcgrad_hierarchy``.
- :func:`update_history` -- the official code's EMA of past aggregates (``grad_history``), which gates
  the first round (plain mean) and orders FedGH's pairing.
- :func:`mean_delta` -- FedAvg's mean of deltas, sample-weighted or unweighted, with integer buffers
  cast back.
- :func:`update_size_ratio` -- diagnostics: norm ratio and cosine of an aggregate against the FedAvg
  means of the same deltas (FedLD behaves like an adaptive server step size; this measures it).
- :func:`scaffold_control_update` -- SCAFFOLD option-II client control-variate update and the server's
  control update (:func:`scaffold_server_control`).
- FedPAC (official repo's ``tools.py``): :func:`fedpac_statistics` (a client's v and h),
  :func:`class_prototypes` / :func:`aggregate_prototypes` (global class prototypes),
  :func:`fedpac_head_weights` (the per-client classifier-combination QP, solved with scipy instead of
  cvxpy) and :func:`combine_heads`.

Numerical policy (all functions): arithmetic in float64; the result is cast back to the dtype of the
clients' arrays (``np.result_type`` over clients); integer and boolean tensors (``num_batches_tracked``)
always get the plain mean rounded to the nearest integer, never principal directions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from robustlab.errors import UserError

Deltas = Sequence[Mapping[str, np.ndarray]]

# Columns per block when the m x m Gram matrix is accumulated, so that the float64 working set stays at
# about _BLOCK_BYTES (cache-sized) however large a tensor is (an 11M-parameter tensor with 50 clients
# would otherwise need a 4.4 GB float64 copy).
_BLOCK_BYTES = 2 * 2**20

# Eigenvalues of the Gram matrix at or below this multiple of machine epsilon times lambda_max * m are
# treated as zero (their directions are dropped): below it an eigenvector is rounding noise.
_EIG_DROP_FACTOR = 10.0


# --------------------------------------------------------------------------------------------------
# validation helpers


def _validate(deltas: Deltas, what: str = "deltas") -> list[str]:
    """Check that ``deltas`` is a non-empty list of dicts with identical keys and shapes; return keys."""
    if isinstance(deltas, Mapping) or not isinstance(deltas, Sequence) or len(deltas) == 0:
        raise UserError(
            f"{what} must be a non-empty list with one {{name: array}} dict per client",
            "pass the clients' model changes (local minus global) as a list of dicts",
        )
    first = deltas[0]
    if not isinstance(first, Mapping):
        raise UserError(f"{what}[0] is a {type(first).__name__}, not a dict", "pass one dict per client")
    keys = list(first.keys())
    key_set = set(keys)
    shapes = {k: np.shape(first[k]) for k in keys}
    for i, d in enumerate(deltas[1:], start=1):
        if not isinstance(d, Mapping):
            raise UserError(f"{what}[{i}] is a {type(d).__name__}, not a dict", "pass one dict per client")
        if set(d.keys()) != key_set:
            missing = sorted(key_set - set(d.keys()))[:3]
            extra = sorted(set(d.keys()) - key_set)[:3]
            raise UserError(
                f"client {i} has different keys from client 0 (missing {missing}, extra {extra})",
                "every client must send the same model state entries",
            )
        for k in keys:
            if np.shape(d[k]) != shapes[k]:
                raise UserError(
                    f"client {i} sent shape {np.shape(d[k])} for '{k}' but client 0 sent {shapes[k]}",
                    "every client must train the same model architecture",
                )
    return keys


def _check_k_proportion(k_proportion: float) -> float:
    try:
        value = float(k_proportion)
    except (TypeError, ValueError):
        raise UserError(
            f"k_proportion must be a number in (0, 1], got {k_proportion!r}", "use e.g. 0.8"
        ) from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise UserError(
            f"k_proportion must be in (0, 1], got {k_proportion!r}",
            "use a fraction of the clients, e.g. 0.8 (the paper's default)",
        )
    return value


def _is_integer(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_)


def _out_dtype(arrays: Sequence[np.ndarray]) -> np.dtype:
    return np.result_type(*arrays)


def _cast_back(value: np.ndarray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    value = np.asarray(value, dtype=np.float64).reshape(shape)
    if _is_integer(dtype):
        return np.rint(value).astype(dtype)
    return value.astype(dtype, copy=False)


def _flat_arrays(deltas: Deltas, key: str) -> list[np.ndarray]:
    return [np.asarray(d[key]).reshape(-1) for d in deltas]


def _max_abs(flats: Sequence[np.ndarray], key: str) -> float:
    """Largest |entry| over clients; raises UserError naming the client when a value is NaN or inf."""
    best = 0.0
    for i, f in enumerate(flats):
        if f.size == 0:
            continue
        # integers are widened first: abs(int8(-128)) overflows
        v = float(np.max(np.abs(f.astype(np.float64) if _is_integer(f.dtype) else f)))
        if not math.isfinite(v):
            raise UserError(
                f"client {i} sent non-finite values (NaN or inf) for '{key}'",
                "drop that client's update (its local training diverged) before aggregating",
            )
        best = max(best, v)
    return best


def _block_size(m: int) -> int:
    return max(4096, _BLOCK_BYTES // (8 * max(m, 1)))


def _mean_flat(flats: Sequence[np.ndarray], weights: np.ndarray | None = None) -> np.ndarray:
    """(Weighted) mean over clients in float64; ``weights`` must sum to 1 when given."""
    m = len(flats)
    out = np.zeros(flats[0].size, dtype=np.float64)
    for i, f in enumerate(flats):
        w = (1.0 / m) if weights is None else float(weights[i])
        out += w * f.astype(np.float64, copy=False)
    return out


def _gram(flats: Sequence[np.ndarray], scale: float | None = None) -> np.ndarray:
    """m x m Gram matrix of the clients' flattened deltas, in float64, blockwise; with ``scale`` the
    deltas are divided by it first (each block, so squares of huge or tiny entries neither overflow nor
    underflow)."""
    m = len(flats)
    gram = np.zeros((m, m), dtype=np.float64)
    for _start, _stop, b in _column_blocks(flats):
        if scale is not None:
            b /= scale
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # checked by the caller
            gram += b @ b.T
    return gram


def _combine(flats: Sequence[np.ndarray], coef: np.ndarray) -> np.ndarray:
    """sum_i coef_i * flats_i in float64, as one matrix-vector product per cache-sized column block."""
    out = np.empty(flats[0].size, dtype=np.float64)
    coef = np.ascontiguousarray(coef, dtype=np.float64)
    for start, stop, b in _column_blocks(flats):
        np.dot(coef, b, out=out[start:stop])
    return out


def _column_blocks(flats: Sequence[np.ndarray]):
    """Yield (start, stop, block): the clients' entries start:stop stacked as an m x (stop-start) float64
    block, cache-sized; the block buffer is reused, so use it before the next step."""
    m = len(flats)
    d = flats[0].size
    step = _block_size(m)
    block = np.empty((m, min(step, d)), dtype=np.float64)
    for start in range(0, d, step):
        stop = min(start + step, d)
        b = block[:, : stop - start]
        for i, f in enumerate(flats):
            b[i] = f[start:stop]
        yield start, stop, b


# --------------------------------------------------------------------------------------------------
# FedLD


def num_principal_directions(num_clients: int, k_proportion: float = 0.8) -> int:
    """k = floor(k_proportion * m), as the official ``int(len(s) * args.k_proportion)``.

    With few clients and a small ``k_proportion`` this is 0; the official code then returns a zero update
    for every tensor (the sum over directions is empty). We keep at least one direction instead (a zero
    update would silently freeze the model) and document the deviation.
    """
    k_proportion = _check_k_proportion(k_proportion)
    return max(1, int(num_clients * k_proportion))


def _principal_flat(flats: Sequence[np.ndarray], k: int, key: str) -> np.ndarray | None:
    """FedLD's closed form for one tensor, or ``None`` when the tensor is degenerate (caller: mean).

    With G the m x d matrix of client deltas, C = G Gᵀ = U Λ Uᵀ (Λ descending), v_j = Gᵀu_j/√λ_j the right
    singular vectors of G and σ_j² = λ_j:

        ḡ = (1/m) Σ_i ‖Δ_i‖ Σ_{j<k} sign(⟨Δ_i, v_j⟩) (λ_j / Σ_l λ_l) v_j  =  Gᵀ a,
        a = Σ_{j<k} [ (λ_j/Σλ) · (1/m) Σ_i ‖Δ_i‖ sign(⟨Δ_i, v_j⟩) / √λ_j ] u_j,

    and ⟨Δ_i, v_j⟩ = (C u_j)_i / √λ_j, so only the Gram matrix touches the d-dimensional data: cost
    O(m² d) for C plus O(m d) for Gᵀa, memory O(m · block) beyond the inputs. When the raw Gram matrix
    over- or underflows (entries beyond about 1e±150), it is recomputed with G divided by its largest
    |entry|; ``a`` is invariant to that scaling (the result is 1-homogeneous in G). A NaN/inf in the
    deltas shows up as a non-finite Gram matrix and raises ``UserError`` naming the client.
    """
    m = len(flats)
    d = flats[0].size
    if m < 2 or d < 2:
        return None
    gram = _gram(flats)
    peak = float(np.max(np.diag(gram)))
    if not (np.all(np.isfinite(gram)) and peak > 1e-250):
        scale = _max_abs(flats, key)  # raises UserError on NaN/inf input
        if not scale > 0.0:
            return None  # all zero
        gram = _gram(flats, scale)
    gram = 0.5 * (gram + gram.T)
    lam, vecs = np.linalg.eigh(gram)
    lam = lam[::-1].copy()
    vecs = vecs[:, ::-1].copy()
    lam = np.clip(lam, 0.0, None)  # Gram matrices are PSD; negative values are rounding
    lam_max = lam[0]
    if not (np.isfinite(lam_max) and lam_max > 0.0):
        return None
    tol = _EIG_DROP_FACTOR * m * np.finfo(np.float64).eps * lam_max
    keep = int(np.count_nonzero(lam > tol))
    kk = min(k, keep)
    total = float(lam.sum())
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))  # ‖Δ_i‖ / scale
    u = vecs[:, :kk]
    proj = gram @ u  # (C u_j)_i = √λ_j ⟨Δ_i, v_j⟩ (scaled): same sign
    signs = np.sign(proj)  # an exactly orthogonal client contributes nothing (official: 0/0 = NaN)
    weights = lam[:kk] / total
    c = weights * (norms @ signs) / m / np.sqrt(lam[:kk])
    a = u @ c  # ḡ/scale = (G/scale)ᵀ a, hence ḡ = Gᵀ a with the unscaled deltas
    out = _combine(flats, a)
    if not (np.isfinite(out.max()) and np.isfinite(out.min())):  # NaN propagates through max/min
        return None
    return out


def principal_gradient_aggregate(
    deltas: Deltas,
    k_proportion: float = 0.8,
    *,
    history: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """FedLD's principal-gradient aggregation of client deltas (Zeng et al., MICCAI 2024; brief §1.3).

    For every state entry ``key`` separately, with G the m x d matrix of the clients' flattened deltas,
    σ_j, v_j its singular values and right singular vectors (descending), and k = ⌊k_proportion·m⌋::

        ḡ = (1/m) Σ_i ‖Δ_i‖ Σ_{j<k} sign(⟨Δ_i, v_j⟩) · (σ_j² / Σ_{l≤m} σ_l²) · v_j

    i.e. each client's change is rebuilt along the k principal directions with weights σ_j²/Σσ² (the sum
    runs over all m values, as in the official code) and its own norm, and the rebuilt changes are
    averaged **without** sample weights. The official code's sign "calibration" cannot change this value
    and is omitted. The server then sets ``w <- w + ḡ`` (server learning rate 1).

    Computation: through the m x m Gram matrix (never an m x d SVD), cost O(m² d) per tensor, float64,
    eigenvalues clamped at zero and those below 10·m·eps·λ_max dropped (with their direction).

    Fallbacks to the plain unweighted mean (documented deviations where the official code gives NaN or
    crashes): one client; a tensor with a single entry (``num_batches_tracked`` and other scalars, as the
    official code); an all-zero tensor; integer/boolean tensors (mean rounded back to the integer type); a
    non-finite result. A client exactly orthogonal to a direction contributes nothing along it (official:
    0/0 = NaN). If ⌊k_proportion·m⌋ = 0 one direction is used (official: a zero update).

    Args:
        deltas: one ``{key: ndarray}`` per client, all with the same keys and shapes.
        k_proportion: fraction of the m clients' directions kept, in (0, 1]; 0.8 in the paper.
        history: optional EMA of past aggregates (the official ``grad_history``, see :func:`update_history`).
            When given, keys absent from it or whose history is all zero get the plain mean, exactly as
            the official code does in round 0 (and in round 1 under its hidden lr warm-up). When ``None``
            (default) every eligible key uses principal directions.

    Returns:
        ``{key: ndarray}`` in the clients' key order, each of the clients' shape and dtype.

    Raises:
        UserError: ``k_proportion`` outside (0, 1]; empty input; keys or shapes that differ between
            clients; NaN or inf in a client's delta.
    """
    k_proportion = _check_k_proportion(k_proportion)
    keys = _validate(deltas)
    m = len(deltas)
    k = num_principal_directions(m, k_proportion)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        arrays = [np.asarray(d[key]) for d in deltas]
        dtype = _out_dtype(arrays)
        shape = arrays[0].shape
        flats = [a.reshape(-1) for a in arrays]
        gated = history is not None and (key not in history or not np.any(np.asarray(history[key])))
        agg = None
        if not gated and not _is_integer(dtype):
            agg = _principal_flat(flats, k, key)
        if agg is None:
            agg = _mean_flat(flats)
            if not (np.isfinite(agg.max(initial=0.0)) and np.isfinite(agg.min(initial=0.0))):
                _max_abs(flats, key)  # names the client that sent NaN/inf
        out[key] = _cast_back(agg, dtype, shape)
    return out


# --------------------------------------------------------------------------------------------------
# FedGH (gradient harmonisation, as the official FedLD repo implements it)

_FEDGH_EPS = 1e-7  # the official code's ``eplison``


def _harmonize_pair(g0: np.ndarray, g1: np.ndarray, sequential: bool) -> np.ndarray:
    """PCGrad on one pair: if ⟨g0, g1⟩ < 0 remove from each its component along the other; return the sum.

    ``sequential`` reproduces the official last pairing step, where g1 is corrected along the *already
    projected* g0 (with the original inner product, p1 = g1 − ⟨g0,g1⟩/(‖p0‖²+ε)·p0); the official
    intermediate levels use the original g0 for both.
    """
    dot = float(g0 @ g1)
    if dot < 0:
        p0 = g0 - dot / (float(g1 @ g1) + _FEDGH_EPS) * g1
        if sequential:  # official: the *original* inner product, but the projected p0
            p1 = g1 - dot / (float(p0 @ p0) + _FEDGH_EPS) * p0
        else:
            p1 = g1 - dot / (float(g0 @ g0) + _FEDGH_EPS) * g0
        return p0 + p1
    return g0 + g1


def _harmonize_flat(grads: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Official ``pcgrad_hierarchy`` for one tensor: grads is m x d float64, direction is d."""
    m = grads.shape[0]
    if m == 1:
        return grads[0].copy()  # official: assert False
    layer = grads
    hist_norm = math.sqrt(float(direction @ direction))
    while True:
        num = layer.shape[0]
        if num > 2:
            project = (layer @ direction) / hist_norm if hist_norm > 0 else layer @ direction
            # torch's sort(descending=True); a stable order for ties (torch's tie order is unspecified)
            ind = np.argsort(-project, kind="stable")
            new = []
            for i in range(num // 2):
                new.append(_harmonize_pair(layer[ind[i]], layer[ind[num - i - 1]], sequential=False))
            if num % 2 == 1:
                new.append(layer[ind[num // 2]])
            layer = np.stack(new)
        else:  # num == 2
            return _harmonize_pair(layer[0], layer[1], sequential=True) / m


def gradient_harmonize(
    deltas: Deltas,
    history: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """FedGH's gradient harmonisation, transcribed from the official FedLD repo (``pcgrad_hierarchy``).

    Per state entry: order the clients by the projection of their deltas on the history direction
    (the EMA of past aggregates, :func:`update_history`), pair the largest with the smallest, the second
    largest with the second smallest, and so on (an odd middle client passes through); within a pair with
    a negative inner product remove from each delta its component along the other (PCGrad, with the
    official ε = 1e-7 in the denominators), and replace the pair by the sum. Repeat on the sums until two
    remain; harmonise those (the official code corrects the second along the already projected first,
    scaled by the original inner product) and divide their sum by m. Without history for a key (the
    first round) the result is the plain mean, as in the official code. No sample weights are used.

    Deviations: one client returns its delta (official: ``assert False``); integer/boolean tensors get
    the rounded mean; ties in the projection are broken by client order (torch leaves them unspecified).

    Returns ``{key: ndarray}`` with the clients' shapes and dtypes. Raises ``UserError`` on mismatched
    keys/shapes, empty input, or non-finite values.
    """
    keys = _validate(deltas)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        arrays = [np.asarray(d[key]) for d in deltas]
        dtype = _out_dtype(arrays)
        shape = arrays[0].shape
        flats = [a.reshape(-1) for a in arrays]
        _max_abs(flats, key)
        if history is None or key not in history or _is_integer(dtype):
            agg = _mean_flat(flats)
        else:
            direction = np.asarray(history[key], dtype=np.float64).reshape(-1)
            if direction.size != flats[0].size:
                raise UserError(
                    f"history for '{key}' has {direction.size} entries but the deltas have {flats[0].size}",
                    "reset the aggregation history when the model changes",
                )
            grads = np.stack([f.astype(np.float64) for f in flats])
            agg = _harmonize_flat(grads, direction)
        out[key] = _cast_back(agg, dtype, shape)
    return out


def update_history(
    history: Mapping[str, np.ndarray] | None,
    aggregate: Mapping[str, np.ndarray],
    gamma: float = 0.99,
) -> dict[str, np.ndarray]:
    """The official code's ``grad_history`` update: h ← γ·h + (1−γ)·ḡ per key (γ = 0.99).

    A key without history (the first round) is initialised to the aggregate itself, as the official code
    does. Returns a new float64 dict; the inputs are not modified.
    """
    if not (0.0 <= float(gamma) <= 1.0):
        raise UserError(f"gamma must be in [0, 1], got {gamma!r}", "use 0.99 as the official code")
    new: dict[str, np.ndarray] = {}
    for key, value in aggregate.items():
        g = np.asarray(value, dtype=np.float64)
        if history is None or key not in history:
            new[key] = g.copy()
        else:
            new[key] = gamma * np.asarray(history[key], dtype=np.float64) + (1.0 - gamma) * g
    return new


# --------------------------------------------------------------------------------------------------
# FedAvg means and diagnostics


def _normalised_weights(weights: Sequence[float] | None, m: int) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != m or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise UserError(
            f"weights must be {m} finite non-negative numbers with a positive sum, got {list(w)[:5]}",
            "pass each client's number of training examples",
        )
    return w / w.sum()


def mean_delta(deltas: Deltas, weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """FedAvg's aggregate of deltas: Σ_i p_i Δ_i with p_i = n_i/Σn (``weights`` = sample counts) or the
    unweighted mean (``weights=None``, what FedLD's own averaging uses). float64 arithmetic, result in the
    clients' dtype; integer buffers are rounded back."""
    keys = _validate(deltas)
    w = _normalised_weights(weights, len(deltas))
    out: dict[str, np.ndarray] = {}
    for key in keys:
        arrays = [np.asarray(d[key]) for d in deltas]
        flats = [a.reshape(-1) for a in arrays]
        out[key] = _cast_back(_mean_flat(flats, w), _out_dtype(arrays), arrays[0].shape)
    return out


def _ratio_cos(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    ratio = na / nb if nb > 0 else (math.nan if na == 0 else math.inf)
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan
    return ratio, cos


def update_size_ratio(
    deltas: Deltas,
    aggregated: Mapping[str, np.ndarray],
    weights: Sequence[float] | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, float]:
    """How an aggregate compares with FedAvg on the same client deltas (logged per round for FedLD).

    Over the concatenation of ``keys`` (default: every floating-point entry of ``aggregated``; integer
    buffers are skipped), returns

    - ``ratio_unweighted`` = ‖aggregated‖ / ‖unweighted mean of deltas‖ and ``cosine_unweighted``;
    - ``ratio_weighted`` / ``cosine_weighted`` against the sample-weighted mean (only when ``weights``,
      the clients' example counts, are given);
    - ``tensor_ratio_min`` / ``tensor_ratio_max``: the per-tensor norm ratio against the unweighted mean
      (tensors whose mean is zero are skipped);
    - ``norm_aggregated``, ``norm_mean_unweighted`` (and ``norm_mean_weighted``).

    A ratio is ``inf`` when FedAvg's norm is 0 and the aggregate's is not, and ``nan`` for 0/0; a cosine
    is ``nan`` when either norm is 0.
    """
    all_keys = _validate(deltas)
    if keys is None:
        keys = [k for k in all_keys if not _is_integer(np.asarray(aggregated[k]).dtype)]
    else:
        keys = list(keys)
        unknown = [k for k in keys if k not in set(all_keys) or k not in aggregated]
        if unknown:
            raise UserError(f"unknown keys {unknown[:3]}", "use keys present in the deltas and aggregate")
    w = _normalised_weights(weights, len(deltas))
    agg_parts, mean_u_parts, mean_w_parts, tensor_ratios = [], [], [], []
    for k in keys:
        flats = [np.asarray(d[k]).reshape(-1) for d in deltas]
        a = np.asarray(aggregated[k], dtype=np.float64).reshape(-1)
        b = _mean_flat(flats)
        agg_parts.append(a)
        mean_u_parts.append(b)
        if w is not None:
            mean_w_parts.append(_mean_flat(flats, w))
        nb = float(np.linalg.norm(b))
        if nb > 0:
            tensor_ratios.append(float(np.linalg.norm(a)) / nb)

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0)

    agg_vec, mean_u_vec = cat(agg_parts), cat(mean_u_parts)
    ratio_u, cos_u = _ratio_cos(agg_vec, mean_u_vec)
    result = {
        "ratio_unweighted": ratio_u,
        "cosine_unweighted": cos_u,
        "norm_aggregated": float(np.linalg.norm(agg_vec)),
        "norm_mean_unweighted": float(np.linalg.norm(mean_u_vec)),
        "tensor_ratio_min": min(tensor_ratios) if tensor_ratios else math.nan,
        "tensor_ratio_max": max(tensor_ratios) if tensor_ratios else math.nan,
    }
    if w is not None:
        mean_w_vec = cat(mean_w_parts)
        ratio_w, cos_w = _ratio_cos(agg_vec, mean_w_vec)
        result["ratio_weighted"] = ratio_w
        result["cosine_weighted"] = cos_w
        result["norm_mean_weighted"] = float(np.linalg.norm(mean_w_vec))
    return result


# --------------------------------------------------------------------------------------------------
# SCAFFOLD control variates (Karimireddy et al. 2020, option II)


def scaffold_control_update(
    c_local: Mapping[str, np.ndarray],
    c_global: Mapping[str, np.ndarray],
    delta: Mapping[str, np.ndarray],
    num_steps: int,
    lr: float,
) -> dict[str, np.ndarray]:
    """Client control variate after local training, option II: c_i⁺ = c_i − c + (w − θ_i)/(K η).

    ``delta`` is θ_i − w (local minus global), so (w − θ_i) = −delta. Returns c_i⁺ (float64); the client
    sends c_i⁺ − c_i to the server.
    """
    if int(num_steps) <= 0 or not (float(lr) > 0):
        raise UserError(
            f"SCAFFOLD needs num_steps > 0 and lr > 0, got {num_steps} and {lr}",
            "the client must take at least one SGD step with a positive learning rate",
        )
    scale = 1.0 / (int(num_steps) * float(lr))
    return {
        k: np.asarray(c_local[k], dtype=np.float64)
        - np.asarray(c_global[k], dtype=np.float64)
        - scale * np.asarray(delta[k], dtype=np.float64)
        for k in delta
    }


def scaffold_server_control(
    c_global: Mapping[str, np.ndarray],
    control_deltas: Deltas,
    num_clients_total: int,
) -> dict[str, np.ndarray]:
    """Server control update: c ← c + (|S|/N) · mean_{i∈S}(c_i⁺ − c_i)."""
    m = len(control_deltas)
    if num_clients_total < m or m == 0:
        raise UserError(
            f"SCAFFOLD got {m} control deltas for {num_clients_total} clients in total",
            "num_clients_total must be at least the number of replies",
        )
    mean = mean_delta(control_deltas)
    frac = m / num_clients_total
    return {
        k: np.asarray(c_global[k], dtype=np.float64) + frac * np.asarray(mean[k], dtype=np.float64)
        for k in mean
    }


# --------------------------------------------------------------------------------------------------
# FedPAC (Xu et al., ICLR 2023), as the official FedLD repo computes it (``tools.py``, ``methods/fedpac.py``)


def fedpac_statistics(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """A client's feature statistics for FedPAC's classifier collaboration (``statistics_extraction``).

    With p_k the client's label frequencies, μ_k the mean feature of class k and n_k its count:
    ``h[k] = p_k · μ_k`` (a ``(num_classes, d)`` matrix, zero rows for absent classes) and
    ``v = Σ_k [ p_k · tr(F_kᵀF_k)/n_k − p_k² · ‖μ_k‖² ] / N`` (the official code divides by the client's
    data size N).
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    if f.ndim != 2 or f.shape[0] != y.shape[0] or f.shape[0] == 0:
        raise UserError(
            f"fedpac_statistics needs (N, d) features and N labels, got {f.shape} and {y.shape}",
            "pass the model's representations of the client's training samples",
        )
    n = f.shape[0]
    h = np.zeros((num_classes, f.shape[1]))
    v = 0.0
    for k in range(num_classes):
        fk = f[y == k]
        if fk.shape[0] == 0:
            continue
        pk = fk.shape[0] / n
        mu = fk.mean(axis=0)
        h[k] = pk * mu
        v += pk * float(np.sum(fk * fk)) / fk.shape[0] - pk * pk * float(mu @ mu)
    return v / n, h


def class_prototypes(
    features: np.ndarray, labels: np.ndarray
) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """Mean feature per class present (FedPAC's local prototypes) and the class counts."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).reshape(-1)
    protos: dict[int, np.ndarray] = {}
    sizes: dict[int, int] = {}
    for k in np.unique(y):
        mask = y == k
        protos[int(k)] = f[mask].mean(axis=0)
        sizes[int(k)] = int(mask.sum())
    return protos, sizes


def aggregate_prototypes(
    local_protos: Sequence[Mapping[int, np.ndarray]], local_sizes: Sequence[Mapping[int, int]]
) -> dict[int, np.ndarray]:
    """Global prototypes: per class, the class-count-weighted mean of the clients' prototypes
    (official ``protos_aggregation``)."""
    total: dict[int, np.ndarray] = {}
    count: dict[int, float] = {}
    for protos, sizes in zip(local_protos, local_sizes, strict=True):
        for label, proto in protos.items():
            w = float(sizes[label])
            total[label] = total.get(label, 0.0) + w * np.asarray(proto, dtype=np.float64)
            count[label] = count.get(label, 0.0) + w
    return {label: total[label] / count[label] for label in sorted(total) if count[label] > 0}


def _simplex_qp(p: np.ndarray) -> np.ndarray:
    """argmin αᵀPα subject to α >= 0, Σα = 1 (P symmetric PSD), by SLSQP from the uniform point."""
    from scipy.optimize import minimize

    m = p.shape[0]
    res = minimize(
        lambda a: float(a @ p @ a),
        np.full(m, 1.0 / m),
        jac=lambda a: 2.0 * (p @ a),
        method="SLSQP",
        bounds=[(0.0, 1.0)] * m,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1.0, "jac": lambda a: np.ones_like(a)}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    alpha = np.clip(res.x, 0.0, None)
    return alpha / alpha.sum()


def fedpac_head_weights(
    variances: Sequence[float], hs: Sequence[np.ndarray], eps: float = 1e-3
) -> list[np.ndarray | None]:
    """FedPAC's classifier-collaboration weights (official ``get_head_agg_weight``), one vector per client.

    For client i: P = diag(v) + D with D[j1, j2] = Σ_k ⟨h_i[k] − h_j1[k], h_i[k] − h_j2[k]⟩, and
    α_i = argmin αᵀPα over the probability simplex; weights below ``eps`` are set to 0 (not renormalised,
    as in the official code; :func:`combine_heads` normalises). If P is not PSD it is rebuilt from its
    eigenpairs with eigenvalue >= 0.01 (official); if that fails too the entry is ``None`` (the client
    keeps its own head). The official code solves the QP with cvxpy; here scipy's SLSQP solves it (the
    tests check it against an exact active-set enumeration).
    """
    v = np.asarray(variances, dtype=np.float64).reshape(-1)
    m = v.size
    if m == 0 or len(hs) != m:
        raise UserError(
            f"fedpac_head_weights got {m} variances and {len(hs)} statistics", "pass one per client"
        )
    flat = np.stack([np.asarray(h, dtype=np.float64).reshape(-1) for h in hs])
    out: list[np.ndarray | None] = []
    for i in range(m):
        diff = flat[i][None, :] - flat  # row j: h_i - h_j
        p = np.diag(v) + diff @ diff.T
        p = 0.5 * (p + p.T)
        lam, vec = np.linalg.eigh(p)
        if lam.min() < 0:
            keep = lam >= 0.01
            p = (vec[:, keep] * lam[keep]) @ vec[:, keep].T
            if np.linalg.eigvalsh(0.5 * (p + p.T)).min() < -1e-12 * max(1.0, abs(lam).max()):
                out.append(None)
                continue
        alpha = _simplex_qp(p)
        out.append(np.where(alpha > eps, alpha, 0.0))
    return out


def combine_heads(heads: Sequence[Mapping[str, np.ndarray]], alpha: np.ndarray) -> dict[str, np.ndarray]:
    """Σ_j α_j · head_j / Σ_j α_j per key (official ``agg_classifier_weighted_p``)."""
    a = np.asarray(alpha, dtype=np.float64).reshape(-1)
    if a.size != len(heads) or not a.sum() > 0 or np.any(a < 0):
        raise UserError(
            "combine_heads needs one non-negative weight per head with a positive sum", "check alpha"
        )
    keys = _validate(list(heads), "heads")
    return {
        k: _cast_back(_mean_flat([np.asarray(h[k]).reshape(-1) for h in heads], a / a.sum()),
                      _out_dtype([np.asarray(h[k]) for h in heads]), np.shape(heads[0][k]))
        for k in keys
    }  # fmt: skip
