"""The LoFT equations as pure tensor functions.

Equation and block numbers refer to "LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning" (ICLR 2026),
section 2 and appendix D. This module imports nothing but torch: the optimizers in this package hold state and call
these functions, and the tests check them against dense references.

Notation. A layer's weight is ``W = W0 + U V^T`` with ``W`` of shape (m, n) = (out_features, in_features),
``U`` of shape (m, r) and ``V`` of shape (n, r). In the PEFT tuner the same factors are called ``loft_B = U`` (m, r)
and ``loft_A = V^T`` (r, n). Every function below is written for "the factor being treated" (``x``, k rows) and "the
other factor" (``y``, l rows), so one function serves both sides: for U, ``(x, y) = (U, V)`` and (k, l) = (m, n); for
V, ``(x, y) = (V, U)`` and (k, l) = (n, m).

Every function but ``newton_schulz_lowrank`` (the paper's Algorithm 4, kept as written, 2-D) takes a batch too:
dimensions before the last two are layers, (..., k, r) for (k, r) and so on (``effective_grad_sq_norm`` then sums
over the batch).

Cross terms are stored packed: for each row, the r x r symmetric matrix of products ``g_s g_t`` is kept as its upper
triangle, R = r (r + 1) / 2 numbers (eq. 11 stores all r^2; symmetry halves it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "gram_pinv",
    "scaled_gradient",
    "calibration_matrix",
    "update_first_moment",
    "packed_size",
    "packed_outer",
    "packed_congruence",
    "packed_khatri_rao",
    "update_cross_terms",
    "second_moment_floor",
    "projected_adam_direction",
    "simple_adam_direction",
    "subspace_norm_scale",
    "effective_grad_sq_norm",
    "newton_schulz",
    "newton_schulz_lowrank",
    "update_momentum",
    "projected_muon_direction",
]

# Rows of the (k, l) full-space matrices rebuilt at a time in `projected_adam_direction`: the block's temporaries
# (a few of rows x l floats) stay small whatever the layer shape, so no m x n tensor ever exists.
DEFAULT_BLOCK_ELEMENTS = 1 << 16


def gram_pinv(y: Tensor) -> Tensor:
    """Pseudo-inverse of the Gram matrix, ``(y^T y)^+`` (eq. 5 and footnote 1).

    Args:
        y: a factor, shape (l, r).

    Returns:
        (r, r) symmetric matrix. Equals ``(y^T y)^-1`` when ``y`` has full column rank; directions whose eigenvalue is
        below ``r * eps(dtype) * largest`` are treated as the null space (footnote 1: "if not, we can use the
        pseudo-inverse"). A zero factor gives exactly zero, so the other factor's scaled gradient is 0, not NaN, while
        ``B`` is still at its zero initialisation. No damping is added: a well-conditioned factor gets the exact inverse.
    """
    gram = y.mT @ y
    return torch.linalg.pinv(gram, hermitian=True)


def scaled_gradient(grad: Tensor, other_gram_pinv: Tensor) -> Tensor:
    """Scaled factor gradient, block 2 / eq. (5): ``g~_U = g_U (V^T V)^-1``.

    Args:
        grad: gradient of the treated factor, shape (k, r) (``g_U = g_W V`` or ``g_V = g_W^T U``).
        other_gram_pinv: ``(y^T y)^+`` of the other factor, shape (r, r).

    Returns:
        (k, r). Then ``g~_U V^T = g_W P_V``, the projection of the full gradient onto the other factor's row space.
    """
    return grad @ other_gram_pinv


def calibration_matrix(y_prev: Tensor, y: Tensor, y_gram_pinv: Tensor) -> Tensor:
    """Calibration matrix, eq. (7): ``C = (y_{k-1}^T y_k)(y_k^T y_k)^-1``.

    Args:
        y_prev: the other factor at the previous step, shape (l, r).
        y: the other factor now, shape (l, r).
        y_gram_pinv: ``(y^T y)^+``, shape (r, r).

    Returns:
        (r, r). A moment ``m`` expressed against ``y_prev`` (full-space value ``m y_prev^T``) becomes ``m C``, whose
        full-space value ``m C y^T = m y_prev^T P_y`` is the old value projected onto the new subspace (eq. 8).
    """
    return (y_prev.mT @ y) @ y_gram_pinv


def update_first_moment(exp_avg: Tensor, calibration: Tensor | None, scaled_grad: Tensor, beta1: float) -> Tensor:
    """First moment with calibration, block 3 / eq. (7): ``m_k = beta1 m_{k-1} C + (1 - beta1) g~``.

    Args:
        exp_avg: ``m_{k-1}``, shape (k, r).
        calibration: ``C`` of shape (r, r), or ``None`` for the identity (the other factor did not move, or the
            no-calibration ablation).
        scaled_grad: ``g~``, shape (k, r).
        beta1: first-moment decay.

    Returns:
        ``m_k``, shape (k, r), a new tensor.
    """
    carried = exp_avg if calibration is None else exp_avg @ calibration
    return torch.lerp(scaled_grad, carried, beta1) if beta1 != 0.0 else scaled_grad.clone()


def packed_size(rank: int) -> int:
    """R = r (r + 1) / 2, the number of stored cross terms per row."""
    return rank * (rank + 1) // 2


def _triu(rank: int, device: torch.device) -> tuple[Tensor, Tensor]:
    rows, cols = torch.triu_indices(rank, rank, device=device)
    return rows, cols


def packed_outer(x: Tensor) -> Tensor:
    """Row-wise outer products ``x_i x_i^T`` in packed form: the transposed Khatri-Rao product ``x • x`` of eq. (10).

    Args:
        x: shape (k, r).

    Returns:
        (k, R) with column (s, t), s <= t in ``torch.triu_indices`` order, holding ``x[:, s] * x[:, t]``.
    """
    s, t = _triu(x.shape[-1], x.device)
    return x[..., s] * x[..., t]


def packed_congruence(calibration: Tensor) -> Tensor:
    """The packed form of ``C ⊗ C`` in eq. (11): a matrix ``T`` with ``packed_outer(x C) = packed_outer(x) T``.

    Per row the symmetric cross-term matrix transforms as ``P -> C^T P C``; in packed coordinates
    ``T[(s,t), (a,b)] = C[s,a] C[t,b] + [s < t] C[t,a] C[s,b]``.

    Args:
        calibration: ``C``, shape (r, r).

    Returns:
        (R, R).
    """
    s, t = _triu(calibration.shape[-1], calibration.device)
    c_s, c_t = calibration[..., s, :], calibration[..., t, :]  # (..., R, r): rows s and t of C for each index (s, t)
    direct = c_s[..., s] * c_t[..., t]
    swapped = c_t[..., s] * c_s[..., t]
    off_diagonal = (s != t).to(calibration.dtype).unsqueeze(1)
    return direct + off_diagonal * swapped


def packed_khatri_rao(y: Tensor) -> Tensor:
    """The column-wise Khatri-Rao product ``y * y`` of eq. (12) in packed form, transposed for a GEMM.

    Args:
        y: the other factor, shape (l, r).

    Returns:
        (R, l) with row (s, t) holding ``c_st y[:, s] y[:, t]``, c = 1 on the diagonal and 2 off it, so that for
        packed cross terms ``p`` (k, R) the rebuilt second moment is ``v~ = p @ packed_khatri_rao(y)`` (k, l):
        ``sum_{s,t} P_st y_s y_t = (g . y)^2`` summed over the accumulated gradients.
    """
    s, t = _triu(y.shape[-1], y.device)
    weight = torch.where(s == t, 1.0, 2.0).to(y.dtype)
    return (y[..., s] * y[..., t] * weight).mT.contiguous()


def update_cross_terms(cross: Tensor, congruence: Tensor | None, scaled_grad: Tensor, beta2: float) -> Tensor:
    """Calibrated second-moment accumulator, block 4 / eqs. (11)-(12), packed.

    ``p_k = beta2 p_{k-1} (C ⊗ C) + (1 - beta2) (g~ • g~)``.

    Args:
        cross: ``p_{k-1}``, shape (k, R).
        congruence: ``packed_congruence(C)`` (R, R), or ``None`` for the identity.
        scaled_grad: ``g~``, shape (k, r).
        beta2: second-moment decay.

    Returns:
        ``p_k``, shape (k, R), a new tensor.
    """
    carried = cross if congruence is None else cross @ congruence
    return torch.lerp(packed_outer(scaled_grad), carried, beta2)


def second_moment_floor(beta1: float, beta2: float) -> float:
    """Smallest possible ``v~ / m~^2`` for the moments of one gradient sequence.

    By Cauchy-Schwarz, for ``m~ = (1-beta1) sum_j beta1^j g_j`` and ``v~ = (1-beta2) sum_j beta2^j g_j^2`` (what eqs.
    8-9 define), elementwise ``m~^2 <= (1-beta1)^2 / ((1-beta2) (1 - beta1^2/beta2)) * v~``. The rebuilt
    ``v~ = p (V * V)`` is a sum of r^2 products and cancels in floating point where the true value is near zero; it
    can come out negative or far too small, and Adam's ratio would then amplify the round-off without limit. Clamping
    ``v~ >= floor * m~^2`` keeps ``|m~| / sqrt(v~)`` within the bound the exact moments obey. In exact arithmetic the
    clamp never acts, so the full-rank and definition tests are unaffected.

    (A tighter, step-dependent floor, exact at step 1, was measured to make fp32 runs drift further from fp64 ones:
    where ``m~`` itself is round-off, it turns a near-zero ratio into a full-size one of random sign.)

    Returns:
        The floor, or 0.0 when ``beta1^2 >= beta2`` (no finite bound; only ``v~ >= 0`` is enforced).
    """
    if beta1 * beta1 >= beta2:
        return 0.0
    return (1.0 - beta2) * (1.0 - beta1 * beta1 / beta2) / (1.0 - beta1) ** 2


def projected_adam_direction(
    exp_avg: Tensor,
    cross: Tensor,
    y: Tensor,
    y_gram_pinv: Tensor,
    *,
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    floor: float,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> Tensor:
    """The projected full-space Adam update, block 5 / eq. (13), without forming a (k, l) matrix.

    ``D = [m~ / (1-beta1^k)] / (sqrt(v~ / (1-beta2^k)) + eps)`` with ``m~ = m y^T`` (eq. 8) and ``v~ = p (y * y)``
    (eq. 12), then ``D y (y^T y)^-1``. The caller applies ``x <- (1 - lr wd) x - lr * direction``. ``eps`` is added
    outside the square root, as in ``torch.optim.AdamW``, so that at full rank the update is AdamW's.

    Rows are processed in blocks of about ``block_elements / l`` rows: each block rebuilds its slice of ``m~`` and
    ``v~`` with two GEMMs, does Adam's elementwise step and projects back, so peak temporary memory is a few blocks.

    Args:
        exp_avg: ``m``, shape (k, r).
        cross: packed cross terms ``p``, shape (k, R).
        y: the other factor, shape (l, r).
        y_gram_pinv: ``(y^T y)^+``, shape (r, r).
        bias_correction1: ``1 - beta1^k``.
        bias_correction2: ``1 - beta2^k``.
        eps: Adam's epsilon.
        floor: ``second_moment_floor(beta1, beta2)``.
        block_elements: target number of elements of a (rows, l) block.

    Returns:
        The direction, shape (k, r).
    """
    rows, length = exp_avg.shape[-2], y.shape[-2]
    y_t = y.mT.contiguous()  # (..., r, l)
    khatri_rao = packed_khatri_rao(y)  # (R, l)
    projector = y @ y_gram_pinv  # (l, r): D @ projector == D y (y^T y)^+
    step = max(1, min(rows, block_elements // max(length, 1)))
    inv_sqrt_bc2 = 1.0 / math.sqrt(bias_correction2)
    inv_bc1 = 1.0 / bias_correction1
    out = torch.empty_like(exp_avg)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        first = exp_avg[..., start:stop, :] @ y_t  # (b, l): m~ rows
        second = cross[..., start:stop, :] @ khatri_rao  # (b, l): v~ rows
        if floor > 0.0:
            second = torch.maximum(second, first.square().mul_(floor))
        else:
            second = second.clamp_min_(0.0)
        denom = second.sqrt_().mul_(inv_sqrt_bc2).add_(eps)
        ratio = first.mul_(inv_bc1).div_(denom)
        out[..., start:stop, :] = ratio @ projector
    return out


def simple_adam_direction(
    exp_avg: Tensor, exp_avg_sq: Tensor, *, bias_correction1: float, bias_correction2: float, eps: float
) -> Tensor:
    """LoFT (simple): Adam's elementwise step on the factor, ``m^ / (sqrt(v^) + eps)``, with no full-space rebuild.

    Args:
        exp_avg: calibrated first moment of the scaled gradient, shape (k, r).
        exp_avg_sq: elementwise second moment of the scaled gradient, shape (k, r).

    Returns:
        (k, r).
    """
    denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(eps)
    return (exp_avg / bias_correction1).div_(denom)


def subspace_norm_scale(direction: Tensor, y: Tensor) -> Tensor:
    """LoFT-simple's rescaling (``simple_rescale=True``): ``s = ||d||_F / ||d y^T||_F`` per layer.

    LoFT-simple's factor step ``lr * d`` (``d`` Adam-normalised on the factor, entries of order 1) moves the weight by
    ``lr * d y^T``, whose size grows with the other factor's scale: ``W`` moves by about ``lr * |y|`` where LoFT moves
    it by about ``lr``, so LoFT-simple's learning rate does not carry over from LoFT or AdamW. Scaling the step by
    ``s`` gives the full-space step the Frobenius norm ``lr ||d||_F`` it would have if ``y`` had orthonormal columns,
    which is the size of a full-space Adam step projected onto the r-dimensional subspace (what LoFT's block 5 takes).
    ``s = 1`` for an orthonormal ``y``, and ``s`` is invariant to rescaling ``y``. (Measured on two tasks, this moves
    LoFT-simple's best rate towards LoFT's without making it carry over: see the README's comparison.) Cost O((k + l) r^2):
    ``||d y^T||_F^2 = sum((d^T d) ⊙ (y^T y))``. A zero ``d`` or ``y`` (no step either way) gives ``s = 1``.

    Args:
        direction: ``d``, shape (..., k, r).
        y: the other factor, shape (..., l, r).

    Returns:
        ``s``, shape (..., 1, 1).
    """
    d_gram = direction.mT @ direction  # (..., r, r)
    full_sq = (d_gram * (y.mT @ y)).sum((-2, -1), keepdim=True)
    factor_sq = d_gram.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    return torch.where(full_sq > 0, (factor_sq / full_sq.clamp_min(torch.finfo(y.dtype).tiny)).sqrt(), 1.0)


def effective_grad_sq_norm(grad: Tensor, other_gram_pinv: Tensor) -> Tensor:
    """Squared Frobenius norm of the effective full-space gradient, block 6, in O(k r^2).

    The effective gradient of a layer whose factor x moves is ``g~ y^T = g (y^T y)^+ y^T = g_W P_y`` (k, l). Its squared
    norm is ``tr(g G^+ G G^+ g^T) = tr(g G^+ g^T) = sum((g^T g) ⊙ G^+)`` with ``G = y^T y``, because
    ``G^+ G G^+ = G^+``.

    Args:
        grad: plain gradient of the moving factor, shape (k, r).
        other_gram_pinv: ``(y^T y)^+``, shape (r, r).

    Returns:
        A 0-dim tensor.
    """
    return ((grad.mT @ grad) * other_gram_pinv).sum()


# Newton-Schulz quintic coefficients from Muon: chosen to push singular values into roughly [0.7, 1.2] as fast as
# possible in 5 steps, trading exact orthogonality for speed (Algorithm 3).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Dense NewtonSchulz5 (Algorithm 3): an approximate orthogonalisation of g (m, n); the reference for tests."""
    a, b, c = NS_COEFFICIENTS
    x = g / (torch.linalg.matrix_norm(g)[..., None, None] + eps)
    transposed = g.shape[-2] > g.shape[-1]
    if transposed:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if transposed else x


def newton_schulz_lowrank(
    left: Tensor, right: Tensor, steps: int = 5, eps: float = 1e-7
) -> tuple[Tensor, Tensor, Tensor]:
    """Low-rank NewtonSchulz5 (Algorithm 4) of ``G = left @ right^T`` in the r x r core.

    With ``X = left X_c right^T`` every iterate of Algorithm 3 keeps this form:
    ``X X^T = left (X_c R X_c^T) left^T`` with ``R = right^T right``, so the polynomial acts on the core alone.
    Cost O((m + n) r^2 + r^3).

    Unlike Algorithm 4, which flips the factors when m > n to mirror the dense transpose, this works on whichever side
    is cheaper implicitly: the core iteration ``X_c <- a X_c + (b S L + c (S L)^2) X_c`` with ``S = X_c R X_c^T`` and
    ``L = left^T left`` is the same algebra as ``X <- a X + (b A + c A^2) X`` for ``A = X X^T``. Because
    ``(X X^T)^j X = X (X^T X)^j``, the dense iteration on ``X`` or on ``X^T`` gives the same matrix, so no flip is needed.

    Kept as the paper's algorithm and a test reference; :class:`~loft_peft.LoftMuon` uses
    :func:`projected_muon_direction` instead. In fp32 this form loses accuracy when ``left`` and ``right`` are badly
    conditioned against each other (their Gram matrices are multiplied as they are; see there).

    Args:
        left: (m, r), e.g. the momentum ``m^U``.
        right: (n, r), e.g. ``V``.
        steps: Newton-Schulz iterations.
        eps: added to ``||G||_F`` before normalising.

    Returns:
        ``(left @ core, core, right)`` where ``core`` is (r, r): the orthogonalised matrix is
        ``left @ core @ right^T``; ``left @ core`` (m, r) is the partial polar factor Algorithm 4 returns.
    """
    a, b, c = NS_COEFFICIENTS
    left_gram = left.T @ left
    right_gram = right.T @ right
    norm = torch.sqrt(torch.clamp_min((left_gram * right_gram).sum(), 0.0))  # ||G||_F = sqrt(tr(L R))
    rank = left.shape[1]
    core = torch.eye(rank, dtype=left.dtype, device=left.device) / (norm + eps)
    for _ in range(steps):
        s = core @ right_gram @ core.T
        a_core = s @ left_gram  # (X X^T) X = left (S L) X_c right^T
        poly = b * a_core + c * (a_core @ a_core)
        core = a * core + poly @ core
    return left @ core, core, right


def update_momentum(momentum: Tensor, calibration: Tensor | None, scaled_grad: Tensor, mu: float) -> Tensor:
    """Calibrated heavy-ball momentum, Algorithm 5 lines 13-14: ``m_k = mu m_{k-1} C + g~``.

    Args:
        momentum: ``m_{k-1}``, shape (k, r).
        calibration: ``C`` of shape (r, r), or ``None`` for the identity (the other factor did not move, or the
            no-calibration ablation).
        scaled_grad: ``g~``, shape (k, r).
        mu: momentum coefficient.

    Returns:
        ``m_k``, shape (k, r), a new tensor. Its full-space value ``m_k y^T`` is Muon's momentum ``mu m_{k-1} + g_W``
        with each past gradient projected onto the subspaces the factors have visited since (eq. 8).
    """
    carried = momentum if calibration is None else momentum @ calibration
    return torch.add(scaled_grad, carried, alpha=mu)


def projected_muon_direction(momentum: Tensor, y: Tensor, *, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """The moving factor's LoFT-Muon step, Algorithm 5 lines 17 and 21, in O((k + l) r^2 + r^3).

    Returns ``D`` with ``D y^T = NewtonSchulz5(m y^T)``: the Newton-Schulz orthogonalisation (Algorithm 3) of the
    full-space momentum ``m~ = m y^T`` (eq. 8), expressed on the factor. The caller applies
    ``x <- (1 - lr wd) x - lr * scale * D``; seen in the full space the step is ``-lr * scale * NewtonSchulz5(m~)``,
    of rank at most r with singular values in about [0.7, 1.2].

    Like Algorithm 4 this iterates on an r x r core, but on an orthonormal one. With the thin QR factorisations
    ``m = Q_m R_m`` and ``y = Q_y R_y``, ``m~ = Q_m (R_m R_y^T) Q_y^T``; Newton-Schulz commutes with multiplying by
    matrices of orthonormal columns (``X X^T`` and every odd polynomial in ``X`` keep the outer factors), so
    ``NewtonSchulz5(m~) = Q_m NewtonSchulz5(R_m R_y^T) Q_y^T``, and the dense iteration runs on the (s, t) core.
    Algorithm 4 instead multiplies the Gram matrices ``m^T m`` and ``y^T y`` as they are. Those are badly scaled
    against each other: ``m`` accumulates scaled gradients ``g (y^T y)^-1``, so where ``y`` has condition number
    kappa, ``m^T m`` grows like kappa^2 along the direction in which ``y^T y`` shrinks like kappa^-2, and in fp32 the
    iteration returns singular values of about 1e8 instead of about 1 from kappa of about 1e3 on. The orthonormal core
    is as well scaled as ``m~`` itself: in fp32 the result stays within a relative 3e-4 of the float64 reference up to
    kappa = 1e4, and within 3e-6 for random, well-conditioned factors, as dense Newton-Schulz does.

    Mapping back, ``D = NewtonSchulz5(m~) y (y^T y)^+ = Q_m NewtonSchulz5(R_m R_y^T) (R_y^+)^T``, is exact because
    ``m~``'s rows lie in the column space of ``y``. Directions of ``y`` whose singular value is below
    ``sqrt(r eps(dtype))`` of the largest count as null, the cut-off :func:`gram_pinv` applies to ``y^T y``, so no step
    is taken along a direction the scaled gradient ignores.

    Args:
        momentum: ``m``, shape (k, r) (``m^U`` with k = m, or ``m^V`` with k = n).
        y: the other factor, shape (l, r) (``V`` with l = n, or ``U`` with l = m).
        steps: Newton-Schulz iterations.
        eps: added to ``||m~||_F`` before normalising (Algorithm 3, line 1).

    Returns:
        ``D``, shape (k, r).
    """
    q_m, r_m = torch.linalg.qr(momentum)  # (k, s), (s, r) with s = min(k, r)
    r_y = torch.linalg.qr(y, mode="r").R  # (t, r) with t = min(l, r); Q_y is never needed
    core = newton_schulz(r_m @ r_y.mT, steps=steps, eps=eps)  # (s, t); ||core input||_F = ||m~||_F
    cutoff = math.sqrt(y.shape[-1] * torch.finfo(y.dtype).eps)
    return q_m @ (core @ torch.linalg.pinv(r_y, rtol=cutoff).mT)
