"""The LoFT-AdamW step arranged for speed: the maths of :mod:`loft_peft.optim.maths` for L same-shape layers at once.

Every function here computes what a reference function in ``maths`` computes (each docstring names it), on tensors
with a leading layer dimension L, so that a model's ~150 adapted layers take a few dozen calls per step instead of
thousands. They differ from the references only in fp32 rounding (``tests/test_fast_path.py`` checks this over many
steps and shapes). Where the speed comes from:

* On x86-64 CPUs with AVX2 or AVX-512, in fp32, the fused C kernels of :mod:`loft_peft.optim.native` (built on first
  use where a C compiler is found): block 5 (:func:`projected_adam_update`) as register tiles of the (k, l) moments
  that never leave the cache, blocks 2-4 (:func:`update_moments_`) row block by row block, and the Gram matrices with
  their Cholesky inverses and calibration matrices (:func:`gram_pinv_and_calibration`); an alternating step (either
  variant) is all of these in one call (:func:`alternating_step`), which also writes the new factor into fp32
  parameters. The rest of this module is their PyTorch fallback, and the path for other CPUs, GPUs and float64.
* Gram pseudo-inverses by a batched Cholesky factorisation (:func:`spd_pinv`); the eigendecomposition of
  :func:`maths.gram_pinv` is kept for the matrices where the two could differ (singular or ill-conditioned ones).
* The projected Adam update (:func:`projected_adam_update`, block 5) never forms a (k, l) matrix larger than a row
  block. Its constants (bias corrections, the Cauchy-Schwarz floor, ``-lr``) are folded into the small (l, r) and
  (R, l) matrices, Adam's elementwise step is five passes over the block (one with the optional ``torch.compile``),
  and the last GEMM adds the decayed factor, so the new factor comes out of the pass directly. The block
  temporaries live in a :class:`Workspace` kept between steps.
* Without the native kernels (other CPUs, float64, no C compiler) the same blocks run as batched ``torch.bmm``
  GEMMs over row blocks; every device but the CPU takes them arranged for it (the device path: no host reads, tiles
  sized by a memory budget; see :func:`loft_peft.optim.device.takes_device_path`).

Shapes follow ``maths``: for the treated factor ``x`` (L, k, r) and the other factor ``y`` (L, l, r), R = r (r + 1)/2.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

from . import maths, native
from .device import StepGate, takes_device_path

# Rows of the (k, l) matrices rebuilt at once per layer: about 4 MB of fp32 per temporary, so a 4096 x 14336 layer
# steps with a few tens of MB of scratch while a typical layer (up to ~1M weights) is done in one block. Smaller
# blocks keep the elementwise passes in L2 but pay ~10 calls per block; on 2-core CPUs one big block was faster.
DEFAULT_BLOCK_ELEMENTS = 1 << 20

# On the device path: the most bytes a step's temporaries take beyond the state (LoftAdamW's ``memory_budget``).
# Row blocks are as large as this allows, so that a GPU steps each bucket in few, large operations.
DEFAULT_MEMORY_BUDGET = 256 << 20

@functools.lru_cache(maxsize=None)
def _packed_indices(rank: int, device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Index and weight tensors for the packed upper triangle (``torch.triu_indices`` order), cached.

    ``"s"``, ``"t"``: row and column of each packed entry (s <= t); ``"st"``: its flat position ``s r + t`` in an r x r
    matrix; ``"full"``: for each of the r^2 positions of the symmetric matrix, its packed entry; ``"st_ts"``: those
    followed by the mirrored positions ``t r + s``; ``"kr_weight"``: eq. (12)'s Khatri-Rao weight, 1 on the diagonal
    and 2 off it, as an (R, 1) column; ``"half_diagonal"``: 1/2 on the diagonal, 1 off it.
    """
    s, t = torch.triu_indices(rank, rank, device=device)
    diagonal = s == t
    packed_of = torch.empty(rank, rank, dtype=torch.long, device=device)
    packed_of[s, t] = torch.arange(len(s), device=device)
    packed_of[t, s] = packed_of[s, t]
    return {
        "s": s,
        "t": t,
        "st": s * rank + t,
        "full": packed_of.flatten(),
        "st_ts": torch.cat([s * rank + t, t * rank + s]),
        "kr_weight": torch.where(diagonal, 1.0, 2.0).to(dtype)[:, None],
        "half_diagonal": torch.where(diagonal, 0.5, 1.0).to(dtype),
    }


def _indices(x: Tensor) -> dict[str, Tensor]:
    return _packed_indices(x.shape[-1], str(x.device), x.dtype)


def _select_columns(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(-1, index)`` as a gather: several times faster on CPUs for a last-dimension selection."""
    return torch.gather(x, -1, index.expand(*x.shape[:-1], index.shape[0]))


def packed_outer(x: Tensor) -> Tensor:
    """:func:`maths.packed_outer` for a batch: (..., k, r) -> (..., k, R) with entries ``x_s x_t``, s <= t.

    On the CPU, up to r = 8 the two R-column factors are gathered and multiplied; beyond, gathering the R packed
    products out of all r^2 (one broadcast multiply) moves less memory. Measured on 1024-row blocks. On the device path
    the two factors are selected by ``index_select`` (three launches, no views).
    """
    index = _indices(x)
    if takes_device_path(x):
        return x.index_select(-1, index["s"]).mul_(x.index_select(-1, index["t"]))
    if x.shape[-1] <= 8:
        return _select_columns(x, index["s"]).mul_(_select_columns(x, index["t"]))
    products = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return _select_columns(products, index["st"])


def packed_khatri_rao(y_t: Tensor, scale: float = 1.0) -> Tensor:
    """``scale`` times :func:`maths.packed_khatri_rao` for a batch, from the transposed factor: (L, r, l) -> (L, R, l).

    Row (s, t) holds ``c_st y_s y_t`` (c = 1 on the diagonal, 2 off it), so the rebuilt second moment is
    ``cross @ result`` (eq. 12). Taking ``y^T`` makes both selections gathers of whole rows.
    """
    index = _packed_indices(y_t.shape[-2], str(y_t.device), y_t.dtype)
    weight = index["kr_weight"] * scale if scale != 1.0 else index["kr_weight"]
    return y_t.index_select(-2, index["t"]).mul_(weight).mul_(y_t.index_select(-2, index["s"]))


def packed_congruence_rows(calibration: Tensor) -> Tensor:
    """The transpose of :func:`maths.packed_congruence` for a batch: (L, r, r) -> (L, R, R), ``result[i] = T_i^T``.

    ``T[(s,t), (a,b)] = C[s,a] C[t,b] + [s < t] C[t,a] C[s,b]``. With ``D[a, b, (s,t)] = C[s,a] C[t,b]`` (one
    broadcast product of two column selections of C), ``T^T[(a,b), (s,t)] = (D[a,b] + D[b,a]) * (1/2 if s = t)``:
    both terms are whole-row selections of D. ``T^T`` is also the layout of a linear layer's weight for
    ``p @ T``.
    """
    batch, rank = calibration.shape[0], calibration.shape[-1]
    index = _indices(calibration)
    columns = calibration.transpose(1, 2)  # [a, s] = C[s, a]
    products = columns.index_select(-1, index["s"]).unsqueeze(2) * columns.index_select(-1, index["t"]).unsqueeze(1)
    both = products.view(batch, rank * rank, -1).index_select(1, index["st_ts"])  # rows (a,b) then (b,a), a <= b
    packed = both.shape[-1]
    return (both[:, :packed] + both[:, packed:]).mul_(index["half_diagonal"])


def packed_congruence(calibration: Tensor) -> Tensor:
    """:func:`maths.packed_congruence` for a batch: (L, r, r) -> (L, R, R) (a transposed view)."""
    return packed_congruence_rows(calibration).transpose(1, 2)


def update_moments_(
    grad: Tensor,
    other_gram_pinv: Tensor,
    calibration: Tensor | None,
    exp_avg: Tensor,
    second: Tensor,
    *,
    beta1: float,
    beta2: float,
    full: bool,
    workspace: Workspace,
    simple_step: dict | None = None,
    gate: StepGate | None = None,
    budget: int | None = None,
) -> Tensor | None:
    """Blocks 2-4 for one side of L pairs, in place, for the factor ``x`` (L, k, r) whose gradient is ``grad``.

    ``g~ = g (y^T y)^+`` (:func:`maths.scaled_gradient`), ``m <- lerp(g~, m C, beta1)``
    (:func:`maths.update_first_moment`), and with ``full`` ``second``'s packed cross terms (L, k, R) carried by
    :func:`update_cross_terms_`, else ``second`` is Adam's elementwise second moment of ``g~`` (L, k, r), as LoFT-simple
    keeps it. ``calibration`` (L, r, r) or ``None`` for the identity.

    For LoFT-simple (``full=False``) the factor's step can be taken in the same pass: ``simple_step`` holds
    ``x`` and :func:`simple_adam_update`'s keyword arguments, and its result (L, k, r) is returned. Otherwise returns
    ``None``.

    ``gate`` (the device path's verdict, a :class:`StepGate`): where false, ``grad`` must be zeros and
    ``calibration`` the identity; the decays then count as 1, so the moments keep their values bit for bit.
    """
    if native.usable(grad):
        size = native.update_moments_scratch_size(grad.shape[0], grad.shape[-1])
        folded = None
        if simple_step is not None and not full:
            bc2_sqrt = math.sqrt(simple_step["bias_correction2"])
            folded = dict(
                x=simple_step["x"],
                decay=simple_step["decay"],
                scale=-simple_step["lr"] * bc2_sqrt / simple_step["bias_correction1"],
                eps=simple_step["eps"] * bc2_sqrt,
            )
        new = native.update_moments_(
            grad,
            other_gram_pinv,
            calibration,
            exp_avg,
            second,
            beta1=beta1,
            beta2=beta2,
            full=full,
            scratch=workspace.get("native_moments", (size,), grad),
            simple_step=folded,
        )
        return new
    scaled = torch.bmm(grad, other_gram_pinv)
    carried = exp_avg if calibration is None else torch.bmm(exp_avg, calibration)
    decay1 = beta1 if gate is None else gate.choose(beta1, 1.0, exp_avg)
    decay2 = beta2 if gate is None else gate.choose(beta2, 1.0, exp_avg)
    if beta1 == 0.0 and gate is None:
        exp_avg.copy_(scaled)
    else:
        torch.lerp(scaled, carried, decay1, out=exp_avg)
    del carried  # before the cross terms' blocks are made
    if full:
        update_cross_terms_(second, calibration, scaled, decay2, budget=budget)
        return None
    second.mul_(decay2).addcmul_(scaled, scaled, value=1.0 - beta2)  # where the gate is false, scaled is 0
    if simple_step is None:
        return None
    options = {key: value for key, value in simple_step.items() if key != "x"}
    return simple_adam_update(simple_step["x"], exp_avg, second, gate=gate, **options)


def update_cross_terms_(
    cross: Tensor, calibration: Tensor | None, scaled: Tensor, beta2: float | Tensor, *, budget: int | None = None
) -> None:
    """:func:`maths.update_cross_terms` in place for a batch: ``cross <- lerp(packed_outer(scaled), cross (C ⊗ C),
    beta2)`` (eq. 11), for ``cross`` (L, k, R) and the scaled gradients ``scaled`` (L, k, r).

    Here (the CPU without the native kernels) carrying the cross terms is one batched GEMM with inner size
    R = r (r + 1) / 2. The device path carries each row's r x r matrix as ``C^T P C`` in row blocks whose temporaries
    fit ``budget`` bytes (:data:`DEFAULT_MEMORY_BUDGET`): no (L, k, R) temporary and no (L, R, R) matrix exist.
    """
    if calibration is None and not takes_device_path(cross):
        torch.lerp(packed_outer(scaled), cross, beta2, out=cross)
        return
    if takes_device_path(cross):
        _carry_cross_terms_in_blocks_(cross, calibration, scaled, beta2, budget)
        return
    weights = packed_congruence_rows(calibration)
    torch.lerp(packed_outer(scaled), torch.bmm(cross, weights.transpose(1, 2)), beta2, out=cross)


def _carry_cross_terms_in_blocks_(
    cross: Tensor, calibration: Tensor | None, scaled: Tensor, beta2: float | Tensor, budget: int | None
) -> None:
    """:func:`update_cross_terms_` on the device path: each row's r x r matrix carried as ``C^T P C`` (4 r^3 flops a
    row against the packed GEMM's 2 R^2, and no (L, R, R) matrix, which is 2 GB a layer chunk at r = 128), in row
    blocks whose temporaries fit seven eighths of ``budget`` bytes (the rest holds the bucket's stacked factors,
    gradients and scaled gradients: three of the six copies a bucket is sized for in a quarter). A row's temporaries
    are at most two r x r matrices and a packed row while carrying (``P`` and ``P C``, then ``C^T P`` and
    ``C^T P C``, then that and its packed upper triangle), and two packed rows for the new term
    (:func:`packed_outer`'s two selections)."""
    layers, rows, packed = cross.shape
    rank = scaled.shape[-1]
    index = _indices(scaled)
    carrying = 0 if calibration is None else 2 * rank * rank
    per_row = layers * (carrying + 2 * packed) * cross.element_size()
    step = max(1, min(rows, (DEFAULT_MEMORY_BUDGET if budget is None else budget) * 7 // 8 // per_row))
    for block, grads in zip(cross.split(step, dim=1), scaled.split(step, dim=1)):
        carried = block
        if calibration is not None:
            count = block.shape[1]
            full = block.index_select(-1, index["full"]).view(layers, count * rank, rank)  # P, row by row
            pc = torch.bmm(full, calibration).view(layers, count, rank, rank)  # P C
            del full
            pc_t = pc.transpose(-1, -2).reshape(layers, count * rank, rank)  # (P C)^T = C^T P, P being symmetric
            del pc
            carried = torch.bmm(pc_t, calibration).view(layers, count, rank * rank).index_select(-1, index["st"])
            del pc_t
        torch.lerp(packed_outer(grads), carried, beta2, out=block)
        del carried


def spd_pinv(gram: Tensor) -> Tensor:
    """:func:`maths.gram_pinv` of Gram matrices: (L, r, r) symmetric positive semi-definite -> their pseudo-inverses.

    Cholesky's inverse equals the pseudo-inverse when the matrix is positive definite and well enough conditioned
    that the reference's cut-off (eigenvalues below ``r * eps`` of the largest) removes nothing. That is checked
    per matrix with ``cond(G) <= ||G||_F ||G^-1||_F <= _inverse_limit(G)``; the others (a factor still at zero, a
    rank-deficient factor, r larger than the factor's rows) take the reference's eigendecomposition.
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    # cholesky_inverse raises on a zero pivot, which a failed factorisation can leave; those matrices are redone below,
    # and a valid factor's diagonal is positive, so flooring the diagonal changes nothing else.
    chol.diagonal(dim1=-2, dim2=-1).clamp_(min=torch.finfo(gram.dtype).tiny)
    if takes_device_path(gram):
        # On CUDA cholesky_inverse reads its error codes on the host (a synchronisation); two triangular products do
        # not: G^-1 = L^-T L^-1 with L^-1 from a triangular solve (cuBLAS trsm, which checks nothing).
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
        lower_inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
        inverse = torch.bmm(lower_inverse.mT, lower_inverse)
    else:
        inverse = torch.cholesky_inverse(chol)
    bound = torch.linalg.matrix_norm(gram).mul_(torch.linalg.matrix_norm(inverse))
    accepted = (bound <= _inverse_limit(gram)).logical_and_(info == 0)  # a NaN bound is not accepted
    if takes_device_path(gram):  # no host read of `accepted`: the fallback is computed for all, taken where needed
        # (float64 Gram matrices need the eigendecomposition, one host read on CUDA: soft_pinv's cut-off would need
        # more than float64)
        fallback = torch.linalg.pinv(gram, hermitian=True) if gram.dtype == torch.float64 else soft_pinv(gram)
        return torch.where(accepted[:, None, None], inverse, fallback)
    if not bool(accepted.all()):
        rejected = (~accepted).nonzero().squeeze(1)
        inverse[rejected] = torch.linalg.pinv(gram[rejected], hermitian=True)
    return inverse


def soft_pinv(gram: Tensor, cutoff_dtype: torch.dtype | None = None) -> Tensor:
    """The pseudo-inverse of Gram matrices (L, r, r) with no eigendecomposition and no host read, in float64.

    On a GPU ``linalg.eigh`` (behind :func:`maths.gram_pinv`) checks its result on the host, a synchronisation; this
    takes one QR factorisation, which checks nothing, and a few (r, r) products. For an eigenvalue ``lam`` of
    ``G`` and ``d = r * eps * lam_max`` (the reference's cut-off; ``lam_max`` from ``||G^8||_F^(1/8)``):

    * Tikhonov's ``X = (G^2 + d^2 I)^-1 G`` has eigenvalue ``lam / (lam^2 + d^2)``, and five Newton steps
      ``X (2 I - G X)`` bring it to ``1 / lam`` within a relative ``(d / lam)^64``;
    * ``P = X G``, with eigenvalues ``lam^2 / (lam^2 + d^2)`` in [0, 1], is sharpened by eight rounds of
      ``3 P^2 - 2 P^3`` into the projector onto the eigenvalues above about ``d``, applied as ``P X P``.

    So well above the cut-off the result is ``1 / lam``, below it 0 (a zero factor gives exactly 0), as the
    reference's; only eigenvalues within a small factor of the cut-off, which fp32 arithmetic does not resolve
    anyway, are treated differently. :func:`spd_pinv` uses it on the device path for the matrices it does not accept
    (zero, rank-deficient or ill-conditioned ones). ``cutoff_dtype`` (default: ``gram``'s) sets ``eps``: a float64
    Gram matrix of fp32 factors takes fp32's cut-off.
    """
    g = gram.to(torch.float64)
    g = (g + g.mT) * 0.5  # an fp32 Gram matrix is symmetric to ~1e-7 only, and G^2 would carry that far above d^2
    rank = g.shape[-1]
    frobenius = torch.linalg.matrix_norm(g)
    unit = g / torch.where(frobenius > 0, frobenius, 1.0)[:, None, None]
    power = unit
    for _ in range(3):  # ||(G / ||G||)^8||^(1/8) ||G||: the largest eigenvalue within a factor 1.19 at r = 16
        power = power @ power
    largest = frobenius * torch.linalg.matrix_norm(power).pow(1.0 / 8.0)
    scale = largest * (rank * torch.finfo(cutoff_dtype or gram.dtype).eps)
    scale = torch.where(scale > 0, scale, 1.0)[:, None, None]  # G = 0: any d gives 0
    eye = torch.eye(rank, dtype=g.dtype, device=g.device)
    # Tikhonov as the least-squares problem [G; d I] X = [I; 0], by QR (which checks nothing either): its condition
    # number is the square root of that of G^2 + d^2 I, about 1 / (r eps(fp32)), well within float64.
    q, upper = torch.linalg.qr(torch.cat([g, scale * eye.expand_as(g)], dim=-2))
    x = torch.linalg.solve_triangular(upper, q[:, :rank].mT, upper=True)
    # Few launches on a GPU: every round below is one or two batched products.
    projector = torch.bmm(x, g)
    for _ in range(8):  # P <- 3 P^2 - 2 P^3
        square = torch.bmm(projector, projector)
        projector = torch.baddbmm(square, square, projector, beta=3.0, alpha=-2.0)
    x = torch.bmm(torch.bmm(projector, x), projector)  # below the cut-off x is large (about 1 / d): removed first
    for _ in range(5):  # Newton, X <- 2 X - X G X: the relative error e becomes e^2 (what is left below doubles)
        x = torch.baddbmm(x, torch.bmm(x, g), x, beta=2.0, alpha=-1.0)
    x = torch.bmm(torch.bmm(projector, x), projector)  # and removed again
    return ((x + x.mT) * 0.5).to(gram.dtype)


def _inverse_limit(x: Tensor) -> float:
    """The bound on ``||G||_F ||G^-1||_F`` under which a Cholesky inverse is taken as the pseudo-inverse."""
    return 0.01 / (x.shape[-1] * torch.finfo(x.dtype).eps)


def gram_pinv(y: Tensor) -> Tensor:
    """:func:`maths.gram_pinv` for a batch: ``(y^T y)^+`` of (L, l, r) factors, (L, r, r).

    With the native kernels (fp32 on CPUs) the Gram matrices are summed, factorised and checked in double precision
    in one call; otherwise :func:`spd_pinv` of ``torch.bmm``'s Gram matrices.
    """
    return gram_pinv_and_calibration(y, None)[0]


def gram_pinv_and_calibration(y: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """:func:`gram_pinv` of the factors ``y`` (L, l, r) and, with their previous values ``prev`` (L, l, r), eq. (7)'s
    calibration matrices ``C = prev^T y (y^T y)^+`` (:func:`maths.calibration_matrix`), (L, r, r); ``None`` without."""
    if native.usable(y):
        inverse, gram, rejected, calibration = native.gram_inverse(y, _inverse_limit(y), prev)
        if rejected is not None:
            inverse[rejected] = torch.linalg.pinv(gram[rejected], hermitian=True)
            if prev is not None:
                calibration[rejected] = calibration_matrices(prev[rejected], y[rejected], inverse[rejected])
        return inverse, calibration
    inverse = spd_pinv(torch.bmm(y.transpose(1, 2), y))
    return inverse, (None if prev is None else calibration_matrices(prev, y, inverse))


def calibration_matrices(prev: Tensor, y: Tensor, y_gram_pinv: Tensor) -> Tensor:
    """:func:`maths.calibration_matrix` for a batch: ``prev^T y (y^T y)^+``, (L, r, r). With the native kernels, the
    same bits as :func:`gram_pinv_and_calibration` gives for the same inputs."""
    if native.usable(y):
        return native.calibration_matrices(prev, y, y_gram_pinv)
    return torch.bmm(torch.bmm(prev.transpose(1, 2), y), y_gram_pinv)


def projected_muon_direction(momentum: Tensor, y: Tensor, *, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """:func:`maths.projected_muon_direction` for a batch, (L, k, r).

    The reference maps back with ``pinv(R_y)^T``, a singular value decomposition (which on a GPU reads its error code
    on the host); here ``pinv(R_y)^T = R_y (R_y^T R_y)^+``, with the r x r pseudo-inverse taken by :func:`soft_pinv`
    in float64 (R_y may be ill-conditioned: ``R_y^T R_y`` squares its condition number, beyond fp32) and the same
    cut-off, eigenvalues below ``r eps`` of the largest (singular values of ``R_y`` below ``sqrt(r eps)``).
    """
    q_m, r_m = torch.linalg.qr(momentum)  # (L, k, s), (L, s, r)
    r_y = torch.linalg.qr(y, mode="r").R  # (L, t, r)
    core = maths.newton_schulz(r_m @ r_y.mT, steps=steps, eps=eps)  # (L, s, t)
    r_y64 = r_y.to(torch.float64)
    back = (r_y64 @ soft_pinv(r_y64.mT @ r_y64, cutoff_dtype=y.dtype)).to(y.dtype)  # pinv(R_y)^T, (L, t, r)
    return q_m @ (core @ back)


class Workspace:
    """Scratch tensors kept from one step to the next, so that the large per-block temporaries are allocated once.

    On CPUs this matters more than it seems: glibc returns a freed multi-megabyte block at the top of its heap to the
    system, and allocating it again on the next step costs one page fault per 4 KB, milliseconds per step on the
    machines we measured (and the reason a plain ``torch.optim.AdamW`` step's time jumps around by several times).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}
        # The views handed out, by (name, shape, dtype, device): a step asks for the same ones every time.
        self._views: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A tensor of ``shape`` with ``like``'s dtype and device, reusing the storage kept under ``name``."""
        dtype, device = like.dtype, like.device
        view = self._views.get((name, shape, dtype, device))
        if view is not None:
            return view
        numel = math.prod(shape)
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
            self._views = {k: v for k, v in self._views.items() if k[0] != name or k[2:] != (dtype, device)}
        view = self._views[(name, shape, dtype, device)] = buffer[:numel].view(shape)
        return view


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
    workspace: Workspace | None = None,
    compiled: bool = False,
    gate: StepGate | None = None,
    budget: int | None = None,
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
        workspace: where the block temporaries live between calls (a fresh one if ``None``).
        compiled: do Adam's elementwise step in one ``torch.compile``-d pass (falls back to eager if that fails).
        gate: the device path's verdict (a :class:`StepGate`): where false, the result is ``x`` itself, bit for bit.
        budget: on the device path, the bytes the row blocks' temporaries may take (:data:`DEFAULT_MEMORY_BUDGET`);
            it replaces ``block_elements``.

    With the native kernels (fp32 on CPUs) the whole update is one call that holds only the (r, l) and (R, l) column
    matrices (in ``workspace``) and register tiles of the (k, l) ones; ``block_elements`` and ``compiled`` apply to the
    PyTorch path only.

    Returns:
        The new factors, (L, k, r), a new tensor.
    """
    workspace = Workspace() if workspace is None else workspace
    layers, length = x.shape[0], y.shape[1]
    scale_first, kappa, eps_scaled = _block5_constants(bias_correction1, bias_correction2, eps, floor)
    if native.usable(x):
        size = native.projected_adam_scratch_size(layers, length, x.shape[-1])
        new = native.projected_adam_update(
            x,
            exp_avg,
            cross,
            y,
            y_gram_pinv,
            decay=decay,
            first_scale=scale_first,
            projector_scale=-lr * kappa,
            eps=eps_scaled,
            floored=floor > 0.0,
            scratch=workspace.get("native", (size,), x),
        )
        return new
    projector_scale = -lr * kappa if gate is None else gate.choose(-lr * kappa, 0.0, x)
    if gate is not None:
        base = x * gate.choose(decay, 1.0, x)
    else:
        base = x * decay if decay != 1.0 else x
    floored = floor > 0.0
    if takes_device_path(x):
        elements = (DEFAULT_MEMORY_BUDGET if budget is None else budget) // x.element_size()
        tiling = _device_tiling(layers, x.shape[1], length, x.shape[-1], elements, compiled)
        return _projected_adam_update_tiled(x, exp_avg, cross, y, y_gram_pinv, base, scale_first, projector_scale,
                                            eps_scaled, floored, compiled, tiling=tiling, workspace=None)
    # One bmm per GEMM for all L layers, so a block holds rows of every layer.
    step = min(x.shape[1], max(1, block_elements // (layers * length)))
    return _projected_adam_update_tiled(x, exp_avg, cross, y, y_gram_pinv, base, scale_first, projector_scale,
                                        eps_scaled, floored, compiled, tiling=(layers, length, step),
                                        workspace=workspace)


@functools.lru_cache(maxsize=None)
def _device_tiling(
    layers: int, rows: int, length: int, rank: int, elements: int, compiled: bool
) -> tuple[int, int, int]:
    """Block 5's tiles on the device path: ``(layers, columns, rows)`` of a tile, the fewest launches that fit.

    Of a budget of ``elements`` numbers, an eighth holds the bucket's stacked factors still alive during block 5
    (:meth:`~loft_peft.optim.base.LoftOptimizerBase.shape_buckets` sizes a bucket for six copies in a quarter, of
    which three live here). A chunk of layers and columns has column matrices of ``(2 r + R) x columns`` per layer,
    made with temporaries of twice their size (after the last chunk's are freed, while no block is alive); a tile's
    two blocks, m~ and v~ (layers x rows x columns each), fit beside them. Among the splits into equal parts, the one
    with the fewest launches (about 7 per column chunk, 9 per tile, 4 compiled) wins.
    """
    per_column = 2 * rank + rank * (rank + 1) // 2
    room = elements * 7 // 8
    per_tile = 4 if compiled else 9
    best: tuple[int, int, int, int] | None = None  # (launches, chunk, columns, rows)
    for chunk in sorted({-(-layers // n) for n in range(1, layers + 1)}, reverse=True):
        layer_chunks = -(-layers // chunk)
        for column_chunks in range(1, min(length, 256) + 1):
            columns = -(-length // column_chunks)
            if -(-length // columns) != column_chunks:
                continue  # the same split as a smaller count
            held = chunk * per_column * columns
            if 2 * held > room:
                continue
            most_rows = (room - held) // (2 * chunk * columns)
            if most_rows < 1:
                continue
            row_tiles = -(-rows // min(rows, most_rows))
            launches = layer_chunks * column_chunks * (7 + per_tile * row_tiles)
            if best is None or launches < best[0]:
                best = (launches, chunk, columns, -(-rows // row_tiles))
    if best is None:  # a budget too small for any split: the smallest tiles
        return 1, max(1, min(length, room // 2 // per_column)), 1
    return best[1], best[2], best[3]


def _projected_adam_update_tiled(
    x: Tensor,
    exp_avg: Tensor,
    cross: Tensor,
    y: Tensor,
    y_gram_pinv: Tensor,
    base: Tensor,
    scale_first: float,
    projector_scale: float | Tensor,
    eps: float,
    floored: bool,
    compiled: bool,
    *,
    tiling: tuple[int, int, int],
    workspace: Workspace | None,
) -> Tensor:
    """:func:`projected_adam_update` with batched GEMMs, in tiles of ``tiling = (layers, columns, rows)``: chunks of
    layers, of the other factor's rows (the columns of the (k, l) matrices) and of rows. The projection back sums over
    the column tiles."""
    layers = x.shape[0]
    chunk, columns, step = tiling
    out = base.clone() if base is x else base
    for first_layer in range(0, layers, chunk):
        layer_slice = slice(first_layer, first_layer + chunk)
        y_t = y[layer_slice].transpose(1, 2)  # (chunk, r, l)
        pinv_scaled = y_gram_pinv[layer_slice] * projector_scale
        blocks = list(zip(exp_avg[layer_slice].split(step, 1), cross[layer_slice].split(step, 1),
                          out[layer_slice].split(step, 1)))
        for y_cols in y_t.split(columns, 2):
            first_cols = y_cols * scale_first if scale_first != 1.0 else y_cols  # m~ = m @ first_cols
            second_cols = packed_khatri_rao(y_cols)  # (chunk, R, c): v~ = p @ second_cols
            projector = torch.bmm(pinv_scaled, y_cols).transpose(1, 2)  # (chunk, c, r)
            for m_rows, p_rows, out_rows in blocks:
                if workspace is None:  # the device path: two blocks, freed after use
                    first, second = torch.bmm(m_rows, first_cols), torch.bmm(p_rows, second_cols)
                    ratio = _adam_ratio_(first, second, eps, floored, compiled=compiled)
                else:
                    shape = (m_rows.shape[0], m_rows.shape[1], y_cols.shape[2])
                    first = torch.bmm(m_rows, first_cols, out=workspace.get("first", shape, x))
                    second = torch.bmm(p_rows, second_cols, out=workspace.get("second", shape, x))
                    square = workspace.get("square", shape, x) if floored else None
                    ratio = _adam_ratio_(first, second, eps, floored, square, compiled)
                out_rows.baddbmm_(ratio, projector)
                del first, second, ratio  # before the next block's are made: one block alive at a time
            del first_cols, second_cols, projector  # before the next chunk's are made
    return out


def _block5_constants(
    bias_correction1: float, bias_correction2: float, eps: float, floor: float
) -> tuple[float, float, float]:
    """:func:`projected_adam_update`'s ``a = sqrt(floor)`` (1 without a floor), ``kappa`` and ``eps sqrt(bc2)``."""
    scale_first = math.sqrt(floor) if floor > 0.0 else 1.0
    kappa = math.sqrt(bias_correction2) / (scale_first * bias_correction1)
    return scale_first, kappa, eps * math.sqrt(bias_correction2)


def alternating_step(
    sides: dict[str, dict],
    *,
    full: bool,
    move_b: bool,
    beta1: float,
    beta2: float,
    lr: float,
    decay: float,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    floor: float,
    workspace: Workspace,
    step: Tensor,
    phase: Tensor,
    next_phase: int,
    destination: list[Tensor] | None = None,
    destination_strides: tuple[int, int] = (0, 0),
) -> tuple[Tensor | None, Tensor, Tensor] | None:
    """One alternating step of L pairs by the native kernels in one call (:func:`native.alternating_step`): whether
    each factor changed since the last step, the Gram pseudo-inverses not known already
    (:func:`gram_pinv_and_calibration`, or :func:`calibration_matrices` for a known one), :func:`update_moments_` for
    both sides and, with ``full`` (LoFT-AdamW), :func:`projected_adam_update` for the factor that moves; without it
    (LoFT-simple), the moving factor's :func:`simple_adam_update` from its moments' pass.

    ``sides`` maps ``"u"`` (U = B) and ``"v"`` (V = A^T) to dicts with ``x``, ``grad``, the state ``exp_avg``,
    ``second`` (cross terms, or ``exp_avg_sq``), ``prev``, the known pseudo-inverses ``pinv_prev`` (of ``prev``) and
    ``pinv_now`` (of ``x``) or ``None``, and ``calibrate`` (see :func:`native.alternating_step`). Only for factors
    :func:`native.usable` takes.

    The moving factor's new value is written to ``destination`` (see :func:`native.alternating_step`), or else
    returned in a workspace buffer, to be copied out; the step counts ``step`` gain one and the phases ``phase`` become
    ``next_phase``. Returns ``(that value or None, U's pseudo-inverse, V's)``, or
    ``None`` when a computed Gram matrix is singular or ill-conditioned or a factor changed in some layers only:
    nothing has been written then, and the separate calls handle it.
    """
    u, v = sides["u"], sides["v"]
    (layers, rows_u, rank), rows_v = u["x"].shape, v["x"].shape[1]
    if full:
        scale_first, kappa, eps_scaled = _block5_constants(bias_correction1, bias_correction2, eps, floor)
        constants: tuple[float, ...] = (scale_first, -lr * kappa, eps_scaled)
    else:  # as update_moments_ folds simple_adam_update's
        root = math.sqrt(bias_correction2)
        constants = (-lr * root / bias_correction1, eps * root)
    size = native.alternating_step_scratch_size(layers, rows_u, rows_v, rank, full)
    return native.alternating_step(
        u,
        v,
        full=full,
        move_b=move_b,
        beta1=beta1,
        beta2=beta2,
        limit=_inverse_limit(u["x"]),
        decay=decay,
        constants=constants,
        floored=full and floor > 0.0,
        scratch=workspace.get("native", (size,), u["x"]),
        step=step,
        phase=phase,
        next_phase=next_phase,
        destination=destination,
        destination_strides=destination_strides,
    )


def _adam_ratio_(
    first: Tensor, second: Tensor, eps: float, floored: bool, square: Tensor | None = None, compiled: bool = False
) -> Tensor:
    """``first / (sqrt(max(second, first^2)) + eps)`` into ``second`` (``floored``), else
    ``first / (sqrt(max(second, 0)) + eps)``.

    ``square`` (a block like ``first``) is scratch for ``first^2``: five passes over the block. Without it, the
    maximum is taken as ``(second - first^2)^+ + first^2`` (six passes, no third block). With ``compiled`` one pass,
    through :func:`_fused_ratio` (if it compiles).
    """
    if compiled:
        fused = _fused_ratio()
        if fused is not None:
            try:
                fused(first, second, torch.tensor(eps, dtype=first.dtype), floored)
                return second
            except Exception as error:  # noqa: BLE001 - no compiler, unsupported backend...: eager is always right
                _disable_compile(error)
    if floored and square is not None:
        torch.maximum(second, torch.mul(first, first, out=square), out=second)
    elif floored:
        second.addcmul_(first, first, value=-1.0).clamp_min_(0.0).addcmul_(first, first)
    else:
        second.clamp_min_(0.0)
    second.sqrt_().add_(eps)
    return torch.div(first, second, out=second)


def _ratio_into_second(first: Tensor, second: Tensor, eps: Tensor, floored: bool) -> None:
    bounded = torch.maximum(second, first * first) if floored else second.clamp_min(0.0)
    second.copy_(first / (bounded.sqrt() + eps))


_FUSED_RATIO: list = []  # [compiled function] once built, [None] once compiling has failed


def _fused_ratio():
    """``_ratio_into_second`` through ``torch.compile``: one pass over the block instead of five.

    ``eps`` changes every step (it carries the bias correction), so it is passed as a tensor, and shapes are dynamic:
    one compilation serves every step and block. ``None`` once compiling has proved unavailable.
    """
    if not _FUSED_RATIO:
        try:
            _FUSED_RATIO.append(torch.compile(_ratio_into_second, dynamic=True, fullgraph=True))
        except Exception as error:  # noqa: BLE001 - e.g. a platform torch.compile does not support
            _disable_compile(error)
    return _FUSED_RATIO[0]


def _disable_compile(error: Exception) -> None:
    warnings.warn(f"torch.compile is unavailable for the LoFT kernels ({error!r}); using eager PyTorch.", stacklevel=3)
    _FUSED_RATIO[:] = [None]


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
    rescale_by: Tensor | None = None,
    gate: StepGate | None = None,
) -> Tensor:
    """``decay * x - lr * maths.simple_adam_direction(...)`` per layer, (L, k, r) (a new tensor), in three passes:
    ``m / (sqrt(v) + eps sqrt(bc2))`` times ``sqrt(bc2) / bc1`` is the reference's ``(m / bc1) / (sqrt(v / bc2) + eps)``.

    With ``rescale_by`` (the other factor, (L, l, r)) the direction is scaled by :func:`maths.subspace_norm_scale`.
    With ``gate`` (the device path's verdict, a :class:`StepGate`), the result is ``x`` itself where it is false.
    """
    denom = torch.sqrt(exp_avg_sq).add_(eps * math.sqrt(bias_correction2))
    value = -lr * math.sqrt(bias_correction2) / bias_correction1
    if gate is not None:
        base = x * gate.choose(decay, 1.0, x)
        direction = torch.div(exp_avg, denom)
        if rescale_by is not None:
            direction.mul_(maths.subspace_norm_scale(direction, rescale_by))
        return base.add_(direction.mul_(gate.choose(value, 0.0, x)))
    base = x * decay if decay != 1.0 else x
    if rescale_by is None:
        return torch.addcdiv(base, exp_avg, denom, value=value)
    direction = torch.div(exp_avg, denom)
    scale = maths.subspace_norm_scale(direction, rescale_by)
    return torch.add(base, direction.mul_(scale), alpha=value)
