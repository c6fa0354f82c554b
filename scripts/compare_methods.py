"""Run several methods (and learning rates) through ``loft-train`` on the same data and steps, and compare them.

Each (method, learning rate) pair is one ``loft-train`` run in its own process and folder under ``--output-dir``, with
everything else identical (config, seed, data split, steps). The script then writes a markdown table and one PNG of
overlaid training and evaluation loss curves. A run that already finished (its ``metrics.json`` exists) is reused,
and one that was interrupted is resumed from its last checkpoint, so the script can be run again after a stop.

Example (the README's table)::

    python scripts/compare_methods.py --methods lora dora loft loft-simple loft-muon full --rank 4 \\
        --learning-rates 2e-4 --max-steps 200 --output-dir runs/compare \\
        --markdown docs/compare_methods.md --plot docs/compare_methods.png -- --eval-steps 50 --max-eval-examples 64

Arguments after ``--`` go to every ``loft-train`` run unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loft_peft.plotting import plot_loss_curves
from loft_peft.train import METHODS, last_complete_checkpoint, write_atomic

# Training loss in the table: the mean of the logged losses over this last share of the run, which is less noisy
# than the last logged value and, unlike the Trainer's train_loss, not dominated by the first steps.
FINAL_SHARE = 0.1


def _format_lr(lr: float) -> str:
    return f"{lr:g}"


def run_one(method: str, lr: float, args: argparse.Namespace, extra: list[str]) -> Path:
    """Run (or reuse, or resume) one ``loft-train`` run, its output in ``<output-dir>/logs/``; returns its folder."""
    name = f"{method}-r{args.rank}-lr{_format_lr(lr)}"
    folder = Path(args.output_dir) / name
    if (folder / "metrics.json").is_file():
        print(f"[compare] reusing {folder}", flush=True)
        return folder
    command = [sys.executable, "-m", "loft_peft.train"]
    if args.config:
        command += ["--config", args.config]
    command += ["--method", method, "--rank", str(args.rank), "--learning-rate", repr(lr),
                "--max-steps", str(args.max_steps), "--output-dir", str(folder), *extra]
    if last_complete_checkpoint(folder) is not None:
        command.append("--resume")
    elif folder.exists():
        command.append("--overwrite")
    log = Path(args.output_dir) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[compare] {shlex.join(command)} > {log}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with open(log, "a") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        raise SystemExit(f"[compare] {method} at lr {lr:g} failed with exit code {code}; see {log}")
    print(f"[compare] {method} lr={lr:g} done in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def final_train_loss(history: list[dict]) -> float:
    """Mean logged training loss over the last ``FINAL_SHARE`` of the steps."""
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    last_step = losses[-1][0]
    tail = [loss for step, loss in losses if step > last_step * (1 - FINAL_SHARE)]
    return sum(tail) / len(tail)


def markdown_table(metrics: list[dict], command: str) -> str:
    zero_shot = next((m["eval_loss_before_training"] for m in metrics if m.get("eval_loss_before_training")), None)
    first = metrics[0]
    lines = [
        "# Methods compared on the default run",
        "",
        f"Model: {first['model']}; data: {first['data']}; {first['steps']} optimizer steps; "
        f"{first['train_examples']} training blocks available, {first['eval_examples']} held-out evaluation blocks; "
        f"device: {first['device']} ({first['torch_threads']} threads).",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        f"Train loss: mean of the logged losses over the last {FINAL_SHARE:.0%} of the steps. Eval: the held-out "
        "blocks after the last step. Seconds per step: wall time of the optimizer steps alone (forward, backward, "
        "clip, step), on a shared machine, so compare them only within this table. Peak memory: "
        f"{first['peak_memory_kind'].replace('_', ' ')}.",
        "",
        "| method | rank | lr | trainable params | train loss | eval loss | eval perplexity | s / step | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if zero_shot is not None:
        lines.append(f"| no training | - | - | 0 | - | {zero_shot:.4f} | {_ppl(zero_shot):.2f} | - | - |")
    for m in metrics:
        lines.append(
            f"| {m['method']} | {m['rank'] if m['rank'] is not None else '-'} | {m['lr']:g} | "
            f"{m['trainable_parameters']:,} | {final_train_loss(m['log_history']):.4f} | {m['eval_loss']:.4f} | "
            f"{m['eval_perplexity']:.2f} | {m['seconds_per_step']:.2f} | {m['peak_memory_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _ppl(loss: float) -> float:
    from loft_peft.data import perplexity

    return perplexity(loss)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "scripts/compare_methods.py", *argv])
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "dora", "loft", "loft-simple", "full"],
                        choices=METHODS)
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[2e-4])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--config", help="a loft-train YAML config; default: the embedded default")
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--markdown", default="docs/compare_methods.md")
    parser.add_argument("--plot", default="docs/compare_methods.png")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each is its own process)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS per run; 0 leaves torch's default. On a busy machine 1 is much faster: "
                             "threads that wait for each other at every parallel region stall when cores are taken.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    runs = [(method, lr) for method in args.methods for lr in args.learning_rates]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        folders = list(pool.map(lambda run: run_one(*run, args, extra), runs))
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in folders]
    for path in (args.markdown, args.plot):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(args.markdown), markdown_table(metrics, command))
    several_lrs = len(args.learning_rates) > 1
    curves = {
        (f"{m['method']} lr={m['lr']:g}" if several_lrs else m["method"]): m["log_history"] for m in metrics
    }
    plot_loss_curves(curves, args.plot, title=f"{metrics[0]['model']}, r={args.rank}, "
                                              f"{metrics[0]['steps']} steps")
    print(Path(args.markdown).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
