"""The paper's simulated experiment (section 2.5, figure 2): low-rank matrix factorisation with Adam.

``f(W) = ||W - T||_F^2`` for a random target ``T`` of shape (m, n) = (1024, 512) and rank 8, from ``W = 0``. Full
fine-tuning runs AdamW on ``W``; LoRA runs AdamW on ``W = B A`` (LoRA's initialisation: A Kaiming-uniform, B zero,
alpha = 1); LoFT runs LoFT-AdamW on the same factors, with and without its alternation and calibration. The learning
rate is tuned for full AdamW and reused for every method, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .optim.adamw import LoftAdamW

METHODS = ("full", "loft", "loft-no-alternation", "loft-no-calibration", "lora")


@dataclass
class Problem:
    target: torch.Tensor  # (m, n), rank r
    rank: int


def make_problem(m: int = 1024, n: int = 512, rank: int = 8, seed: int = 0, dtype=torch.float32) -> Problem:
    """A random rank-``rank`` target with unit-variance entries."""
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(m, rank, generator=generator, dtype=dtype)
    right = torch.randn(n, rank, generator=generator, dtype=dtype)
    return Problem(target=left @ right.T / math.sqrt(rank), rank=rank)


def _relative_loss(weight: torch.Tensor, target: torch.Tensor) -> float:
    return float((weight - target).square().sum() / target.square().sum())


def run(method: str, problem: Problem, *, lr: float, steps: int, seed: int = 0) -> list[float]:
    """Optimise ``f`` with one method; returns ``f(W_k) / ||T||^2`` for k = 0..steps."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    target = problem.target
    m, n = target.shape
    if method == "full":
        weight = nn.Parameter(torch.zeros_like(target))
        optimizer: torch.optim.Optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=0.0)

        def current() -> torch.Tensor:
            return weight
    else:
        torch.manual_seed(seed)
        factor_a = nn.Parameter(torch.empty(problem.rank, n, dtype=target.dtype))
        nn.init.kaiming_uniform_(factor_a, a=math.sqrt(5))
        factor_b = nn.Parameter(torch.zeros(m, problem.rank, dtype=target.dtype))
        if method == "lora":
            optimizer = torch.optim.AdamW([factor_b, factor_a], lr=lr, weight_decay=0.0)
        else:
            optimizer = LoftAdamW(
                [{"params": [factor_b, factor_a], "loft": True}],
                lr=lr,
                alternate=method != "loft-no-alternation",
                calibrate=method != "loft-no-calibration",
            )

        def current() -> torch.Tensor:
            return factor_b @ factor_a

    losses = [_relative_loss(current().detach(), target)]
    for _ in range(steps):
        loss = (current() - target).square().sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(_relative_loss(current().detach(), target))
    return losses


def tune_full_adamw_lr(problem: Problem, candidates: Sequence[float], steps: int) -> float:
    """The learning rate with the lowest final loss for full AdamW (the paper tunes it there and reuses it)."""
    finals = {lr: run("full", problem, lr=lr, steps=steps)[-1] for lr in candidates}
    return min(finals, key=lambda lr: (not math.isfinite(finals[lr]), finals[lr]))
