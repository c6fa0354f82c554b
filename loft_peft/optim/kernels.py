"""The LoFT-AdamW step arranged for speed: the maths of :mod:`loft_peft.optim.maths` for L same-shape layers at once.

Every function here computes what a reference function in ``maths`` computes (each docstring names it), on tensors
with a leading layer dimension L, so that a model's ~150 adapted layers take a few dozen calls per step instead of
thousands. They differ from the references only in fp32 rounding (``tests/test_fast_path.py`` checks this over many
steps and shapes). Where the speed comes from:

* Gram pseudo-inverses by a batched Cholesky factorisation (:func:`spd_pinv`); the eigendecomposition of
  :func:`maths.gram_pinv` is kept for the matrices where the two could differ (singular or ill-conditioned ones).
* The projected Adam update (:func:`projected_adam_update`, block 5) never forms a (k, l) matrix larger than a row
  block. Its constants (bias corrections, the Cauchy-Schwarz floor, ``-lr``) are folded into the small (l, r) and
  (l, R) matrices, Adam's elementwise step is five passes over the block, and the last GEMM adds the decayed factor,
  so the new factor comes out of the pass directly.
* On CPUs, the three GEMMs of that pass go through oneDNN when PyTorch was built with it: for these skinny shapes
  (inner dimension r or r (r + 1) / 2) it runs about twice as fast as the BLAS behind ``torch.matmul`` on the CPUs
  we measured (AVX-512 kernels where the BLAS picks AVX2 ones). Anything else (GPUs, other dtypes, builds without
  oneDNN) takes batched ``torch.bmm``.

Shapes follow ``maths``: for the treated factor ``x`` (L, k, r) and the other factor ``y`` (L, l, r), R = r (r + 1)/2.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# Rows of the (k, l) matrices rebuilt at once per layer: about 4 MB of fp32 per temporary, so a 4096 x 14336 layer
# steps with a few tens of MB of scratch while a typical layer (up to ~1M weights) is done in one block. Smaller
# blocks keep the elementwise passes in L2 but pay ~10 calls per block; on 2-core CPUs one big block was faster.
DEFAULT_BLOCK_ELEMENTS = 1 << 20

# oneDNN for the large CPU GEMMs: None until first probed, then whether it is available and agrees with torch.mm.
# Set to False to force the torch.bmm path (the benchmarks and tests do, to measure and check both).
USE_ONEDNN: bool | None = None


def _onednn_available() -> bool:
    global USE_ONEDNN
    if USE_ONEDNN is None:
        USE_ONEDNN = _probe_onednn()
    return USE_ONEDNN


def _probe_onednn() -> bool:
    """Whether ``torch.ops.mkldnn._linear_pointwise`` exists here and computes ``x @ w^T (+ other)`` as torch does.

    The op is the one ``torch.compile`` uses for CPU linear layers; it is not public API, so it is checked once on
    a small problem and silently replaced by ``torch.bmm`` if it is missing, fails, or disagrees.
    """
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(7, 5, generator=generator)
        w = torch.randn(3, 5, generator=generator).T.contiguous().T  # a transposed view, as the weights here can be
        other = torch.randn(7, 3, generator=generator)
        plain = op(x, w, None, "none", [], "")
        added = op.binary(x, other, w, None, "add")
        return bool(
            torch.allclose(plain, x @ w.T, rtol=1e-5, atol=1e-5)
            and torch.allclose(added, x @ w.T + other, rtol=1e-5, atol=1e-5)
        )
    except Exception:  # noqa: BLE001 - any failure means "not usable here", and the bmm path is always correct
        return False


def _use_onednn(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and _onednn_available()


@functools.lru_cache(maxsize=None)
def _packed_indices(rank: int, device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Index and weight tensors for the packed upper triangle (``torch.triu_indices`` order), cached.

    ``"full"``: for each flat position ``a r + b`` of an r x r matrix, the packed index of (min(a, b), max(a, b));
    ``"st"``: flat position ``s r + t`` of each packed entry (s <= t) in an r x r matrix; ``"st_ts"``: those followed
    by the mirrored positions ``t r + s``; ``"kr_weight"``: 1 on the diagonal, 2 off it (eq. 12's Khatri-Rao weight);
    ``"half_diagonal"``: 1/2 on the diagonal, 1 off it.
    """
    s, t = torch.triu_indices(rank, rank, device=device)
    diagonal = s == t
    packed_of = torch.empty(rank, rank, dtype=torch.long, device=device)
    packed_of[s, t] = packed_of[t, s] = torch.arange(s.shape[0], device=device)
    return {
        "full": packed_of.flatten(),
        "st": s * rank + t,
        "st_ts": torch.cat([s * rank + t, t * rank + s]),
        "kr_weight": torch.where(diagonal, 1.0, 2.0).to(dtype),
        "half_diagonal": torch.where(diagonal, 0.5, 1.0).to(dtype),
    }


def _indices(x: Tensor) -> dict[str, Tensor]:
    return _packed_indices(x.shape[-1], str(x.device), x.dtype)


def _all_products(x: Tensor) -> Tensor:
    """(..., k, r) -> (..., k, r * r) with entry ``s r + t`` holding ``x_s x_t``; r^2 products where R would do,
    because one broadcast multiply is cheaper than two gathers for the small r used here."""
    return (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)


def packed_outer(x: Tensor) -> Tensor:
    """:func:`maths.packed_outer` for a batch: (..., k, r) -> (..., k, R) with entries ``x_s x_t``, s <= t."""
    return _all_products(x).index_select(-1, _indices(x)["st"])


def packed_khatri_rao_rows(y: Tensor, scale: float = 1.0) -> Tensor:
    """``scale`` times :func:`maths.packed_khatri_rao` transposed, for a batch: (L, l, r) -> (L, l, R).

    Row j holds ``c_st y_js y_jt`` (c = 1 on the diagonal, 2 off it), so the rebuilt second moment is
    ``cross @ result^T``. This (l, R) layout is the one a linear layer's weight has, which oneDNN wants.
    """
    weight = _indices(y)["kr_weight"]
    return _all_products(y).index_select(-1, _indices(y)["st"]).mul_(weight * scale if scale != 1.0 else weight)


def packed_congruence(calibration: Tensor) -> Tensor:
    """:func:`maths.packed_congruence` for a batch: (L, r, r) -> (L, R, R), from one Kronecker product.

    ``T[(s,t), (a,b)] = C[s,a] C[t,b] + [s < t] C[t,a] C[s,b]``; both terms are entries of ``K = C ⊗ C``, and for
    s = t they coincide, so ``T = (K[st] + K[ts]) * (1/2 on the diagonal)`` restricted to the packed columns (a, b).
    """
    batch, rank = calibration.shape[0], calibration.shape[-1]
    index = _indices(calibration)
    kron = (calibration[:, :, None, :, None] * calibration[:, None, :, None, :]).reshape(batch, rank * rank, -1)
    rows = kron.index_select(1, index["st_ts"]).index_select(2, index["st"])  # (L, 2R, R)
    packed = rows.shape[-1]
    return (rows[:, :packed] + rows[:, packed:]).mul_(index["half_diagonal"][:, None])


# From this rank on, cross terms are carried to a new basis as r x r matrices (two GEMMs with inner size r, 4 r^3
# per row) rather than by the packed (R, R) congruence matrix (2 R^2 = r^2 (r + 1)^2 / 2 per row).
UNPACKED_CONGRUENCE_RANK = 12


def apply_congruence(cross: Tensor, calibration: Tensor) -> Tensor:
    """``cross @ packed_congruence(C)`` (eq. 11's ``p (C ⊗ C)``) for a batch: (L, k, R), (L, r, r) -> (L, k, R).

    Per row the cross terms are the symmetric r x r matrix ``P``, and the product is the packed ``C^T P C``. For
    larger r it is cheaper to form that directly, ``X = P C`` then ``X^T C = C^T P C``, than to multiply by the
    (R, R) matrix.
    """
    rank = calibration.shape[-1]
    if rank < UNPACKED_CONGRUENCE_RANK:
        return torch.bmm(cross, packed_congruence(calibration))
    layers, rows = cross.shape[0], cross.shape[1]
    index = _indices(calibration)
    full = cross.index_select(-1, index["full"]).view(layers, rows * rank, rank)  # rows of P_i, stacked
    right = torch.bmm(full, calibration).view(layers, rows, rank, rank)  # P_i C
    both = torch.bmm(right.transpose(-1, -2).reshape(layers, rows * rank, rank), calibration)  # (P_i C)^T C
    return both.view(layers, rows, rank * rank).index_select(-1, index["st"])


def spd_pinv(gram: Tensor) -> Tensor:
    """:func:`maths.gram_pinv` of Gram matrices: (L, r, r) symmetric positive semi-definite -> their pseudo-inverses.

    Cholesky's inverse equals the pseudo-inverse when the matrix is positive definite and well enough conditioned
    that the reference's cut-off (eigenvalues below ``r * eps`` of the largest) removes nothing. That is checked
    per matrix with ``cond(G) <= ||G||_F ||G^-1||_F <= 0.01 / (r * eps)``; the others (a factor still at zero, a
    rank-deficient factor, r larger than the factor's rows) take the reference's eigendecomposition.
    """
    rank = gram.shape[-1]
    chol, info = torch.linalg.cholesky_ex(gram)
    failed = info != 0
    if bool(failed.any()):  # cholesky_inverse raises on a zero pivot; these get the eigendecomposition below anyway
        chol[failed] = torch.eye(rank, dtype=chol.dtype, device=chol.device)
    inverse = torch.cholesky_inverse(chol)
    limit = 0.01 / (rank * torch.finfo(gram.dtype).eps)
    bound = torch.linalg.matrix_norm(gram).mul_(torch.linalg.matrix_norm(inverse))
    accepted = (bound <= limit).logical_and_(~failed)  # a NaN bound is not accepted
    if not bool(accepted.all()):
        rejected = (~accepted).nonzero().squeeze(1)
        inverse[rejected] = torch.linalg.pinv(gram[rejected], hermitian=True)
    return inverse


def gram_pinv(y: Tensor) -> Tensor:
    """:func:`maths.gram_pinv` for a batch: ``(y^T y)^+`` of (L, l, r) factors, (L, r, r)."""
    return spd_pinv(torch.bmm(y.transpose(1, 2), y))


def effective_grad_sq_norm(grad: Tensor, other_gram_pinv: Tensor) -> Tensor:
    """:func:`maths.effective_grad_sq_norm` summed over a batch: ``sum_L sum((g^T g) ⊙ (y^T y)^+)``, 0-dim."""
    return torch.bmm(grad.transpose(1, 2), grad).mul_(other_gram_pinv).sum()


def projected_adam_update(
    x: Tensor,
    exp_avg: Tensor,
    cross: Tensor,
    y: Tensor,
    y_gram_pinv: Tensor,
    *,
    lr: float,
    decay: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    floor: float,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Tensor:
    """The new factor ``decay * x - lr * direction`` with :func:`maths.projected_adam_direction`'s direction (eq. 13).

    For each layer, ``direction = D y (y^T y)^+`` with ``D = [m~/bc1] / (sqrt(max(v~, floor m~^2)/bc2) + eps)``,
    ``m~ = m y^T`` (eq. 8) and ``v~ = p (y * y)`` (eq. 12). Scaling ``m~`` by ``a = sqrt(floor)`` (the clamp then
    compares ``v~`` with ``(a m~)^2``) and pulling ``sqrt(bc2) / bc1`` out of the ratio,

        ``D = kappa * (a m~) / (sqrt(max(v~, (a m~)^2)) + eps sqrt(bc2))``,  ``kappa = sqrt(bc2) / (a bc1)``,

    so ``a`` goes into ``y`` for the first GEMM and ``-lr * kappa`` into the projector ``(y^T y)^+ y^T`` of the last
    one, which also adds ``decay * x``. Without a floor (``floor == 0``) ``a = 1`` and ``v~`` is clamped at 0, as in
    the reference.

    Args:
        x: the factor that moves, (L, k, r).
        exp_avg: its first moment ``m``, (L, k, r).
        cross: its packed cross terms ``p``, (L, k, R).
        y: the other factor, (L, l, r).
        y_gram_pinv: ``(y^T y)^+``, (L, r, r).
        lr, decay: the step is ``decay * x - lr * direction`` (``decay = 1 - lr * weight_decay``).
        bias_correction1, bias_correction2, eps, floor: as in :func:`maths.projected_adam_direction`.
        block_elements: about how many elements of a layer's (rows, l) block are formed at once.

    Returns:
        The new factor, (L, k, r), a new tensor.
    """
    layers, rows, length = x.shape[0], x.shape[1], y.shape[1]
    scale_first = math.sqrt(floor) if floor > 0.0 else 1.0
    kappa = math.sqrt(bias_correction2) / (scale_first * bias_correction1)
    eps_scaled = eps * math.sqrt(bias_correction2)
    first_rows = y * scale_first if scale_first != 1.0 else y  # (L, l, r): m~ = m @ first_rows^T
    second_rows = packed_khatri_rao_rows(y)  # (L, l, R): v~ = p @ second_rows^T
    projector_rows = torch.bmm(y_gram_pinv * (-lr * kappa), y.transpose(1, 2))  # (L, r, l)
    base = x * decay if decay != 1.0 else x
    if not _use_onednn(x):
        # One bmm per GEMM for all L layers, so the block holds rows of every layer.
        step = min(rows, max(1, block_elements // max(layers * length, 1)))
        blocks = []
        for start in range(0, rows, step):
            rows_slice = slice(start, min(start + step, rows))
            first = torch.bmm(exp_avg[:, rows_slice], first_rows.transpose(1, 2))
            second = torch.bmm(cross[:, rows_slice], second_rows.transpose(1, 2))
            ratio = _adam_ratio_(first, second, floor > 0.0, eps_scaled)
            blocks.append(torch.baddbmm(base[:, rows_slice], ratio, projector_rows.transpose(1, 2)))
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    # oneDNN's linear takes one weight, so layers go one at a time; the row block is per layer.
    linear = torch.ops.mkldnn._linear_pointwise
    step = min(rows, max(1, block_elements // max(length, 1)))
    layer_results = []
    for i in range(layers):
        blocks = []
        for start in range(0, rows, step):
            rows_slice = slice(start, min(start + step, rows))
            first = linear(exp_avg[i, rows_slice], first_rows[i], None, "none", [], "")
            second = linear(cross[i, rows_slice], second_rows[i], None, "none", [], "")
            ratio = _adam_ratio_(first, second, floor > 0.0, eps_scaled)
            blocks.append(linear.binary(ratio, base[i, rows_slice], projector_rows[i], None, "add"))
        layer_results.append(blocks[0] if len(blocks) == 1 else torch.cat(blocks))
    return layer_results[0].unsqueeze(0) if layers == 1 else torch.stack(layer_results)


def _adam_ratio_(first: Tensor, second: Tensor, floored: bool, eps: float) -> Tensor:
    """``first / (sqrt(max(second, first^2)) + eps)`` into ``second`` (``max(second, 0)`` when not ``floored``)."""
    if floored:
        torch.maximum(second, torch.mul(first, first), out=second)
    else:
        second.clamp_min_(0.0)
    second.sqrt_().add_(eps)
    return torch.div(first, second, out=second)


def simple_adam_update(
    x: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    decay: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
) -> Tensor:
    """``decay * x - lr * maths.simple_adam_direction(...)`` in three passes: ``m / (sqrt(v) + eps sqrt(bc2))``
    times ``sqrt(bc2) / bc1`` is the reference's ``(m / bc1) / (sqrt(v / bc2) + eps)``."""
    denom = torch.sqrt(exp_avg_sq).add_(eps * math.sqrt(bias_correction2))
    base = x * decay if decay != 1.0 else x
    return torch.addcdiv(base, exp_avg, denom, value=-lr * math.sqrt(bias_correction2) / bias_correction1)
