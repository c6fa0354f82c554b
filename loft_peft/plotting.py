"""Loss curves from the Trainer's ``log_history``: one run (``loss.png``) or several overlaid (method comparisons)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def loss_series(log_history: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train, eval)`` lists of ``(step, loss)`` from a Trainer ``log_history``, one point per step in step order.

    A resumed run's history can hold a step twice (the checkpoint's entry and the resumed run's); the later wins.
    """
    train = {int(h["step"]): float(h["loss"]) for h in log_history if "loss" in h and "step" in h}
    evaluation = {int(h["step"]): float(h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h}
    return sorted(train.items()), sorted(evaluation.items())


def plot_run(log_history: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str | None = None) -> None:
    """One run's training and evaluation loss on one axis, with markers (a run with one logged point shows it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    train, evaluation = loss_series(log_history)
    if train:
        ax.plot(*zip(*train), color="C0", marker="o", markersize=3, linewidth=1.4, label="training loss")
    if evaluation:
        ax.plot(*zip(*evaluation), color="C1", marker="s", markersize=4, linewidth=1.4, linestyle="--",
                label="evaluation loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    _finish_axes([ax])
    _save_png(fig, path)


def plot_loss_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *,
                     title: str | None = None) -> None:
    """Draw training loss (left) and evaluation loss (right) of each run, one colour per run, and write a PNG.

    The file is written to a temporary name and renamed, so an interrupted call never leaves half an image.

    Args:
        runs: label -> the run's ``trainer.state.log_history``.
        path: the PNG to write.
        title: a title over both panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (label, history) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        train, evaluation = loss_series(history)
        if train:
            ax_train.plot(*zip(*train), color=colour, label=label, linewidth=1.4)
        if evaluation:
            ax_eval.plot(*zip(*evaluation), color=colour, label=label, marker="o", markersize=3.5, linewidth=1.4)
    ax_train.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    ax_eval.set(title="evaluation loss", xlabel="optimizer step", ylabel="loss")
    _finish_axes([ax_train, ax_eval])
    if title:
        fig.suptitle(title, fontsize=10)
    _save_png(fig, path)


def _finish_axes(axes: Sequence[Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        low, high = ax.dataLim.intervalx
        if ax.has_data() and high - low < 2:  # a step or two: widen, or the ticks fall between whole steps
            ax.set_xlim(math.floor(low) - 1, math.ceil(high) + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def _save_png(fig: Any, path: str | os.PathLike) -> None:
    """Write ``fig`` to a temporary name and rename it, so an interrupted call never leaves half an image."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        # mkstemp makes the file private; the result should get the permissions any new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
