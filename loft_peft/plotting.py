"""Loss curves from the Trainer's ``log_history``: one run (``loss.png``) or several overlaid (method comparisons)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def loss_series(log_history: Sequence[Mapping[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """``(train, eval)`` lists of ``(step, loss)`` from a Trainer ``log_history``."""
    train = [(int(h["step"]), float(h["loss"])) for h in log_history if "loss" in h and "step" in h]
    evaluation = [(int(h["step"]), float(h["eval_loss"])) for h in log_history if "eval_loss" in h and "step" in h]
    return train, evaluation


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
    for ax in (ax_train, ax_eval):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
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
