"""Compare training methods the way users choose between them: each at its best learning rate, on more than one task.

Every run is one ``loft-train`` process in its own folder under ``--output-dir``, with everything but the method,
learning rate, Adam eps and seed identical (model, data, steps, schedule, clipping). The script works in phases:

1. **Sweep**: every method of ``--methods`` at every rate of ``--learning-rates`` (seed ``--seed``).
2. **Follow-ups at the best rate** of each method (lowest held-out loss): the methods of ``--repeat`` again with the
   seeds of ``--repeat-seeds`` (the noise), and those of ``--eps-methods`` with each eps of ``--epsilons``.

A run that already finished (its ``metrics.json`` exists) is reused, and one that was interrupted resumes from its last
checkpoint, so the script can be stopped and started again; ``--summary`` (JSON) is rewritten after every run, so it
always holds what has finished. At the end it writes ``--markdown`` (best-vs-best table, the whole sweep, the
follow-ups), ``--lr-plot`` (held-out loss against learning rate, one line per method) and ``--plot`` (loss curves of
each method at its best rate).

Tasks (``--task``): ``shakespeare`` trains on Shakespeare's comedies, tragedies, romances, problem and Roman plays
but one of each genre (those five are the held-out text) and evaluates the histories as a related but different text;
``gsm8k`` trains on 1,119 of GSM8K's 1,319 test problems, evaluates the other 200 (split by
:func:`loft_peft.assets.gsm8k_files`) and AIME 2025's 30 problems as the related text; ``default`` is loft-train's
default data with no related text.

Methods are loft-train's (``lora dora loft loft-simple loft-muon full``) and these variants of them:
``loft-simple-rescaled`` (``--loft-simple-rescale true``), ``loft-no-alternation`` (``--loft-alternate false``),
``loft-no-calibration`` (``--loft-calibrate false``).

Example (the README's Shakespeare sweep; arguments after ``--`` go to every run)::

    python scripts/compare_methods.py --task shakespeare --rank 4 --max-steps 50 --threads 1 \\
        --methods lora loft full dora loft-muon loft-simple loft-simple-rescaled loft-no-alternation \\
            loft-no-calibration \\
        --learning-rates 1e-4 3e-4 1e-3 3e-3 --method-learning-rates lora=1e-4,3e-4,1e-3,3e-3,1e-2 \\
            dora=3e-4,1e-3,3e-3,1e-2 full=1e-5,3e-5,1e-4,3e-4 loft-simple=1e-4,1e-3,3e-3,1e-2,3e-2,1e-1 \\
            loft-simple-rescaled=1e-4,1e-3,3e-3,1e-2 loft-no-alternation=3e-4,1e-3,3e-3 \\
            loft-no-calibration=3e-4,1e-3,3e-3 \\
        --repeat lora loft --eps-methods lora loft --epsilons 1e-6 1e-4 \\
        --output-dir runs/sweep-shakespeare-r4 --name docs/sweep_shakespeare_r4 \\
        -- --block-size 64 --per-device-train-batch-size 4 --max-eval-examples 40 --eval-steps 50 --save-steps 25
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

from loft_peft.data import perplexity
from loft_peft.plotting import plot_loss_curves
from loft_peft.train import METHODS, last_complete_checkpoint, write_atomic

# Training loss in the table: the mean of the logged losses over this last share of the run, which is less noisy
# than the last logged value and, unlike the Trainer's train_loss, not dominated by the first steps.
FINAL_SHARE = 0.1

# Variants: a name, the loft-train method and the extra flags that make it.
VARIANTS = {
    "loft-simple-rescaled": ("loft-simple", ["--loft-simple-rescale", "true"]),
    "loft-no-alternation": ("loft", ["--loft-alternate", "false"]),
    "loft-no-calibration": ("loft", ["--loft-calibrate", "false"]),
}
CHOICES = (*METHODS, *VARIANTS)
TASKS = ("shakespeare", "gsm8k", "default")
GSM8K_TEMPLATE = "Question: {question}\nAnswer: {answer}\n\n"


def task_arguments(task: str) -> tuple[list[str], str]:
    """loft-train arguments that select the task's data, and a one-line description of it."""
    if task == "default":
        return [], "loft-train's default data (Shakespeare's plays), held-out blocks"
    if task == "shakespeare":
        from loft_peft.assets import shakespeare_files, shakespeare_genres

        genres = [g for g in shakespeare_genres() if g != "histories"]
        held_out = [shakespeare_files(g)[-1] for g in genres]  # one unseen play of each genre
        train = [str(p) for p in shakespeare_files(genres) if p not in held_out]
        related = [str(p) for p in shakespeare_files("histories")]
        return (["--data-files", *train, "--eval-data-files", *map(str, held_out),
                 "--related-eval-data-files", *related],
                f"Shakespeare's plays except the histories, {len(train)} for training; held out: one play of each "
                f"genre ({', '.join(p.stem for p in held_out)}); related text: the 11 histories")
    from loft_peft.assets import gsm8k_files

    files = gsm8k_files()
    return ([
        "--data-files", str(files["train"]), "--eval-data-files", str(files["held_out"]),
        "--related-eval-data-files", str(files["aime2025"]), "--text-template", GSM8K_TEMPLATE,
    ], "GSM8K: 1,119 of its 1,319 test problems for training, the other 200 held out (split by us, "
       "loft_peft.assets.gsm8k_files); related text: AIME 2025's 30 problems")


def run_name(method: str, rank: int, lr: float, eps: float | None, seed: int, base_seed: int) -> str:
    name = f"{method}-r{rank}-lr{lr:g}"
    if eps is not None:
        name += f"-eps{eps:g}"
    if seed != base_seed:
        name += f"-seed{seed}"
    return name


def run_one(spec: dict, args: argparse.Namespace, extra: list[str]) -> dict | None:
    """Run (or reuse, or resume) one ``loft-train`` run; returns its summary record (``None`` for a run not finished
    with ``--report-only``)."""
    folder = Path(args.output_dir) / spec["name"]
    if not (folder / "metrics.json").is_file() and args.report_only:
        print(f"[compare] not finished: {folder}", flush=True)
        return None
    if not (folder / "metrics.json").is_file():
        method, flags = VARIANTS.get(spec["method"], (spec["method"], []))
        command = [sys.executable, "-m", "loft_peft.train"]
        if args.config:
            command += ["--config", args.config]
        command += ["--method", method, *flags, "--rank", str(args.rank), "--learning-rate", repr(spec["lr"]),
                    "--max-steps", str(args.max_steps), "--seed", str(spec["seed"]), "--output-dir", str(folder),
                    *args.task_arguments, *args.device_arguments]
        if spec["eps"] is not None:
            command += ["--adam-epsilon", repr(spec["eps"])]
        if not spec.get("zero_shot"):  # the untrained model's losses are the same for every run: evaluated once
            command += ["--eval-on-start", "false"]
        command += extra
        if last_complete_checkpoint(folder) is not None:
            command.append("--resume")
        elif folder.exists():
            command.append("--overwrite")
        log = Path(args.output_dir) / "logs" / f"{spec['name']}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[compare] {shlex.join(command)} > {log}", flush=True)
        start = time.perf_counter()
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        with open(log, "a") as handle:
            code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        if code != 0:
            raise SystemExit(f"[compare] {spec['name']} failed with exit code {code}; see {log}")
        print(f"[compare] {spec['name']} done in {time.perf_counter() - start:.0f} s", flush=True)
    else:
        print(f"[compare] reusing {folder}", flush=True)
    return record(spec, json.loads((folder / "metrics.json").read_text()))


def final_train_loss(history: list[dict]) -> float:
    """Mean logged training loss over the last ``FINAL_SHARE`` of the steps."""
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    last_step = losses[-1][0]
    tail = [loss for step, loss in losses if step > last_step * (1 - FINAL_SHARE)]
    return sum(tail) / len(tail)


def record(spec: dict, metrics: dict) -> dict:
    """What the tables need from one run's ``metrics.json``."""
    return {
        **spec,
        "train_loss": final_train_loss(metrics["log_history"]),
        "eval_loss": metrics["eval_loss"],
        "related_eval_loss": metrics.get("related_eval_loss"),
        "eval_loss_before_training": metrics.get("eval_loss_before_training"),
        "related_eval_loss_before_training": metrics.get("related_eval_loss_before_training"),
        "seconds_per_step": metrics["seconds_per_step"],
        "peak_memory_mb": metrics["peak_memory_mb"],
        "trainable_parameters": metrics["trainable_parameters"],
        "steps": metrics["steps"],
        "model": metrics["model"],
        "device": metrics["device"],
        "torch_threads": metrics["torch_threads"],
        "train_examples": metrics["train_examples"],
        "eval_examples": metrics["eval_examples"],
        "related_eval_examples": metrics.get("related_eval_examples"),
        "log_history": metrics["log_history"],
    }


def best_by_method(records: list[dict]) -> dict[str, dict]:
    """Each method's sweep run (default eps, base seed) with the lowest held-out loss."""
    best: dict[str, dict] = {}
    for r in records:
        if r["phase"] == "sweep" and (r["method"] not in best or r["eval_loss"] < best[r["method"]]["eval_loss"]):
            best[r["method"]] = r
    return best


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{perplexity(value):.2f}"


def _edge(r: dict, rates: list[float]) -> str:
    """A mark when the best rate is the sweep's smallest or largest: the optimum may lie outside the sweep."""
    return " (edge)" if len(rates) > 1 and r["lr"] in (min(rates), max(rates)) else ""


def markdown(records: list[dict], args: argparse.Namespace, command: str, description: str) -> str:
    first = records[0]
    sweep = [r for r in records if r["phase"] == "sweep"]
    best = best_by_method(records)
    rates = sorted({r["lr"] for r in sweep})
    zero = next((r for r in records if r["eval_loss_before_training"] is not None), None)
    related = any(r["related_eval_loss"] is not None for r in records)
    lines = [
        f"# Methods at their best learning rate: {args.task}, r={args.rank}",
        "",
        f"Model: {first['model']}; data: {description}; {first['steps']} optimizer steps; "
        f"{first['train_examples']} training blocks available, {first['eval_examples']} held-out blocks"
        + (f", {first['related_eval_examples']} related-text blocks" if related else "")
        + f"; seed {args.seed}; device: {first['device']} ({first['torch_threads']} threads).",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "Each method's best rate is the one with the lowest held-out loss in the sweep. Train loss: mean of the logged "
        f"losses over the last {FINAL_SHARE:.0%} of the steps. Held-out: blocks of the training distribution not "
        "trained on. Related: a related but different text (not trained on). Seconds per step: wall time of the "
        "training steps (forward, backward, clip, optimizer step; no evaluation), two runs sharing the machine's two "
        "cores: compare them only roughly, and see the timed ablation table in the README. (edge): the best rate is the "
        "smallest or largest swept, so the optimum may lie outside the sweep.",
        "",
        "## Best against best",
        "",
        "| method | best lr | train loss | held-out loss | held-out ppl | related loss | related ppl | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if zero is not None:
        lines.append(f"| no training | - | - | {_loss(zero['eval_loss_before_training'])} | "
                     f"{_ppl(zero['eval_loss_before_training'])} | "
                     f"{_loss(zero['related_eval_loss_before_training'])} | "
                     f"{_ppl(zero['related_eval_loss_before_training'])} | - |")
    for method, r in sorted(best.items(), key=lambda item: item[1]["eval_loss"]):
        own = [x["lr"] for x in sweep if x["method"] == method]
        lines.append(f"| {method} | {r['lr']:g}{_edge(r, own)} | {_loss(r['train_loss'])} | {_loss(r['eval_loss'])} | "
                     f"{_ppl(r['eval_loss'])} | {_loss(r['related_eval_loss'])} | {_ppl(r['related_eval_loss'])} | "
                     f"{r['seconds_per_step']:.2f} |")
    lines += ["", "## The whole sweep (held-out loss; related loss in brackets)", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " |",
              "|---|" + "---|" * len(rates)]
    for method in dict.fromkeys(r["method"] for r in sweep):
        cells = []
        for lr in rates:
            r = next((x for x in sweep if x["method"] == method and x["lr"] == lr), None)
            cells.append("-" if r is None else _loss(r["eval_loss"]) + (
                f" ({_loss(r['related_eval_loss'])})" if r["related_eval_loss"] is not None else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for phase, title in (("seed", "Other seeds at the best rate (the noise)"), ("eps", "Adam's eps at the best rate")):
        rows = [r for r in records if r["phase"] == phase]
        if not rows:
            continue
        lines += ["", f"## {title}", "", "| method | lr | eps | seed | train loss | held-out loss | related loss |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(rows + [best[m] for m in dict.fromkeys(x["method"] for x in rows) if m in best],
                        key=lambda x: (x["method"], x["seed"], x["eps"] or 1e-8)):
            eps = r["eps"] if r["eps"] is not None else 1e-8
            lines.append(f"| {r['method']} | {r['lr']:g} | {eps:g} | {r['seed']} | {_loss(r['train_loss'])} | "
                         f"{_loss(r['eval_loss'])} | {_loss(r['related_eval_loss'])} |")
    return "\n".join(lines) + "\n"


def plot_sweep(records: list[dict], path: str, title: str) -> None:
    """Held-out loss (solid) and related-text loss (dashed) against learning rate, one colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in records if r["phase"] == "sweep"]
    related = any(r["related_eval_loss"] is not None for r in sweep)
    fig, axes = plt.subplots(1, 2 if related else 1, figsize=(12 if related else 6.5, 4.5), squeeze=False)
    for method in dict.fromkeys(r["method"] for r in sweep):
        runs = sorted((r for r in sweep if r["method"] == method), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in runs]
        line, = axes[0][0].plot(lrs, [r["eval_loss"] for r in runs], marker="o", label=method)
        if related:
            axes[0][1].plot(lrs, [r["related_eval_loss"] for r in runs], marker="o", color=line.get_color(),
                            label=method)
    for ax, name in zip(axes[0], ("held-out loss", "related-text loss")):
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "scripts/compare_methods.py", *argv])
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[: argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASKS, default="default")
    parser.add_argument("--methods", nargs="+", default=["lora", "dora", "loft", "loft-simple", "full"],
                        choices=CHOICES)
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[2e-4])
    parser.add_argument("--method-learning-rates", nargs="*", default=[], metavar="METHOD=LR,LR,...",
                        help="another grid for some methods, e.g. full=1e-5,3e-5,1e-4,3e-4")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", nargs="*", default=[], choices=CHOICES,
                        help="methods to run again at their best rate with the seeds of --repeat-seeds")
    parser.add_argument("--repeat-seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--eps-methods", nargs="*", default=[], choices=CHOICES,
                        help="methods to run again at their best rate with each eps of --epsilons")
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1e-6, 1e-4])
    parser.add_argument("--config", help="a loft-train YAML config; default: the embedded default")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: whatever the Trainer picks (a GPU where there is one)")
    parser.add_argument("--output-dir", default="runs/compare")
    parser.add_argument("--name", default=None,
                        help="write NAME.json, NAME.md, NAME_lr.png and NAME_curves.png (default: in --output-dir)")
    parser.add_argument("--markdown", default=None, help="write the tables here instead of NAME.md")
    parser.add_argument("--plot", default=None, help="write the loss curves here instead of NAME_curves.png")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each is its own process)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs that have finished (the tables say which are missing)")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS per run; 0 leaves torch's default. On a busy machine 1 is much faster: "
                             "threads that wait for each other at every parallel region stall when cores are taken.")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
    args.device_arguments = ["--use-cpu", "true"] if args.device == "cpu" else []
    args.task_arguments, description = task_arguments(args.task)
    name = args.name or str(Path(args.output_dir) / "compare")
    Path(name).parent.mkdir(parents=True, exist_ok=True)

    records: list[dict] = []

    def finished(result: dict | None) -> dict | None:
        if result is None:
            return None
        records.append(result)
        write_atomic(Path(name + ".json"), json.dumps(
            {"command": command, "task": args.task, "data": description, "rank": args.rank,
             "runs": [{k: v for k, v in r.items() if k != "log_history"} for r in records]}, indent=1) + "\n")
        return result

    def spec(method: str, lr: float, phase: str, eps: float | None = None, seed: int | None = None) -> dict:
        seed = args.seed if seed is None else seed
        return {"name": run_name(method, args.rank, lr, eps, seed, args.seed), "method": method, "lr": lr,
                "eps": eps, "seed": seed, "phase": phase}

    def run_all(specs: list[dict]) -> None:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda s: finished(run_one(s, args, extra)), specs))

    grids = {m: list(args.learning_rates) for m in args.methods}
    for item in args.method_learning_rates:
        method, _, rates = item.partition("=")
        if method not in grids or not rates:
            parser.error(f"--method-learning-rates {item!r}: give METHOD=LR,LR,... for a method of --methods")
        grids[method] = [float(x) for x in rates.split(",")]
    # Interleaved so that an interrupted sweep has every method at some rates rather than some methods at all.
    sweep = [spec(m, grids[m][i], "sweep") for i in range(max(map(len, grids.values())))
             for m in args.methods if i < len(grids[m])]
    sweep[0]["zero_shot"] = True
    run_all(sweep)
    best = best_by_method(records)
    follow = [spec(m, best[m]["lr"], "seed", seed=s) for m in args.repeat if m in best for s in args.repeat_seeds]
    follow += [spec(m, best[m]["lr"], "eps", eps=e) for m in args.eps_methods if m in best for e in args.epsilons]
    run_all(follow)

    tables = Path(args.markdown or name + ".md")
    tables.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(tables, markdown(records, args, command, description))
    plot_sweep(records, name + "_lr.png", f"{records[0]['model']}, {args.task}, r={args.rank}, "
                                           f"{records[0]['steps']} steps")
    curves = {f"{m} lr={r['lr']:g}": r["log_history"] for m, r in best_by_method(records).items()}
    plot_loss_curves(curves, args.plot or name + "_curves.png",
                     title=f"{args.task}, r={args.rank}: each method at its best rate")
    print(tables.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
