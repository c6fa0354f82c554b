"""Whole training-step time and memory on SmolLM2-135M: LoRA, DoRA, LoFT, LoFT-simple and full fine-tuning.

One step is forward, backward, gradient clipping at 1.0 and the optimizer step, at batch 2 and sequence 128 (random
token ids: the cost does not depend on the text), with adapters of rank r on q/k/v/up/down_proj (150 layers):

* ``lora``: PEFT's ``LoraConfig(r, lora_alpha=2r)`` and ``torch.optim.AdamW``, ``clip_grad_norm_``;
* ``dora``: the same with ``use_dora=True``;
* ``loft`` / ``loft-simple``: ``LoftConfig(r)`` and ``create_loft_optimizer`` (variant full / simple), with the
  optimizer's own effective-gradient clipping (block 6);
* ``full``: every weight trained by ``torch.optim.AdamW``, ``clip_grad_norm_``;
* with ``--methods``, also the building blocks' ablations and LoFT-Muon: ``loft-no-alternation``
  (``alternate=False``), ``loft-no-calibration`` (``calibrate=False``), ``loft-muon`` (``optimizer="muon"``).

All models live in one process and every round runs one step of each in turn (rotating the order), so that the CPU's
drifting speed hits all methods alike; the table gives each method's median step time and the median over rounds of
its time divided by LoRA's in the same round. Time is also split into forward+backward, clipping and optimizer step.
Memory is measured in a fresh child process per method: the peak resident size over three steps (``VmHWM``) and the
optimizer state's bytes.

LoFT's optimizer runs through the fused C kernels of ``loft_peft.optim.native`` where they build (``--no-native``:
through PyTorch operations). Run with all cores (leave OMP_NUM_THREADS unset)::

    python scripts/bench_train_step.py                     # r = 4 and 16, JSON in bench_train_step.json
    python scripts/bench_train_step.py --ranks 16 --rounds 5 --no-memory
    python scripts/bench_train_step.py --ranks 4 --no-memory --output ablations.json \
        --methods lora loft loft-simple loft-no-alternation loft-no-calibration loft-muon
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

METHODS = ("lora", "dora", "loft", "loft-simple", "full")
# What each building block costs: LoFT without it (the paper's ablations), and LoFT-Muon.
ABLATIONS = {"loft-no-alternation": dict(alternate=False), "loft-no-calibration": dict(calibrate=False),
             "loft-muon": dict(optimizer="muon")}
CHOICES = (*METHODS, *ABLATIONS)
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def load_base_model():
    from transformers import AutoModelForCausalLM

    from loft_peft.assets import smollm2_path

    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    model.config.use_cache = False
    return model


def build(method: str, base, rank: int, lr: float = 1e-4):
    """(model, optimizer, clip) for one method; ``clip()`` clips the gradients at norm 1 and returns the norm."""
    from peft import LoraConfig, get_peft_model

    from loft_peft import LoftConfig, create_loft_optimizer

    model = copy.deepcopy(base)
    if method == "full":
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        return model, optimizer, lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)
    if method in ("lora", "dora"):
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, use_dora=method == "dora")
        model = get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        return model, optimizer, lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)
    model = get_peft_model(model, LoftConfig(r=rank, target_modules=TARGETS))
    variant = "simple" if method == "loft-simple" else "full"
    optimizer = create_loft_optimizer(model, lr=lr, variant=variant, **ABLATIONS.get(method, {}))
    return model, optimizer, lambda: optimizer.clip_grad_norm_(1.0)


def batch(vocab_size: int, batch_size: int, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, length), generator=generator)


def train_step(model, optimizer, clip, ids) -> tuple[float, float, float]:
    """One step; returns the seconds spent in forward+backward, clipping, and the optimizer step."""
    tic = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    toc = time.perf_counter()
    clip()
    tac = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return toc - tic, tac - toc, time.perf_counter() - tac


def state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim() > 0)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _child_memory(spec: str, batch_size: int, length: int) -> None:
    method, rank = spec.split(":")
    base = load_base_model()
    model, optimizer, clip = build(method, base, int(rank))
    del base
    ids = batch(model.config.vocab_size, batch_size, length)
    for _ in range(3):
        train_step(model, optimizer, clip, ids)
    print(json.dumps({"peak_rss": _status_bytes("VmHWM"), "state_bytes": state_bytes(optimizer)}))


def measure_memory(method: str, rank: int, batch_size: int, length: int) -> dict:
    command = [sys.executable, __file__, "--child-memory", f"{method}:{rank}", "--batch-size", str(batch_size),
               "--length", str(length)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_rank(base, rank: int, rounds: int, batch_size: int, length: int, methods: tuple[str, ...]) -> dict:
    setups = {method: build(method, base, rank) for method in methods}
    ids = batch(base.config.vocab_size, batch_size, length)
    for model, optimizer, clip in setups.values():  # warm-up: state creation, kernel generation, allocator growth
        model.train()
        for _ in range(2):
            train_step(model, optimizer, clip, ids)
    parts = {m: {"total": [], "forward_backward": [], "clip": [], "optimizer": []} for m in methods}
    ratios = {m: [] for m in methods}
    for round_index in range(rounds):
        order = methods[round_index % len(methods) :] + methods[: round_index % len(methods)]
        this_round = {}
        for method in order:
            forward_backward, clip_s, step_s = train_step(*setups[method], ids)
            this_round[method] = forward_backward + clip_s + step_s
            for key, value in (("forward_backward", forward_backward), ("clip", clip_s), ("optimizer", step_s)):
                parts[method][key].append(value)
            parts[method]["total"].append(this_round[method])
        for method in methods:
            ratios[method].append(this_round[method] / this_round["lora"])
        print(f"  r={rank} round {round_index + 1}/{rounds}: "
              + " ".join(f"{m} {this_round[m]:.3f}s" for m in methods), flush=True)
    del setups
    return {
        "rank": rank,
        "rounds": rounds,
        "median_s": {m: {k: statistics.median(v) for k, v in p.items()} for m, p in parts.items()},
        "ratio_to_lora": {m: statistics.median(r) for m, r in ratios.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="4,16")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurements")
    parser.add_argument("--no-native", action="store_true", help="LoFT through PyTorch operations, not the C kernels")
    parser.add_argument("--methods", nargs="+", choices=CHOICES, default=list(METHODS),
                        help="methods to time (LoRA always: the ratios are to it)")
    parser.add_argument("--output", default="bench_train_step.json")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        _child_memory(args.child_memory, args.batch_size, args.length)
        return
    if args.no_native:
        os.environ["LOFT_PEFT_NATIVE"] = "0"  # read by loft_peft.optim.native here and in the child processes
    from loft_peft.optim import native

    torch.manual_seed(0)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "native": native.enabled(),
        "batch_size": args.batch_size,
        "length": args.length,
        "targets": TARGETS,
        "load_average_start": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    print(f"torch {meta['torch']}, {meta['threads']} threads, native kernels: {meta['native']}, "
          f"load average {meta['load_average_start'][0]:.2f}")
    methods = tuple(dict.fromkeys(["lora", *args.methods]))
    meta["methods"] = list(methods)
    base = load_base_model()
    results = []
    for rank in (int(r) for r in args.ranks.split(",")):
        record = time_rank(base, rank, args.rounds, args.batch_size, args.length, methods)
        if not args.no_memory:
            record["memory"] = {m: measure_memory(m, rank, args.batch_size, args.length) for m in methods}
        results.append(record)
    meta["load_average_end"] = os.getloadavg()
    header = (f"{'method':>19} {'r':>3} | {'step s':>7} {'x LoRA':>7} | {'fwd+bwd':>7} {'clip':>6} {'optim':>6} | "
              f"{'peak RSS GB':>11} {'state MB':>9}")
    print(header)
    print("-" * len(header))
    for record in results:
        for method in methods:
            median = record["median_s"][method]
            memory = record.get("memory", {}).get(method)
            mem_text = "" if memory is None else f"{memory['peak_rss'] / 2**30:11.2f} {memory['state_bytes'] / 2**20:9.1f}"
            print(f"{method:>19} {record['rank']:>3} | {median['total']:7.3f} {record['ratio_to_lora'][method]:6.2f}x | "
                  f"{median['forward_backward']:7.3f} {median['clip']:6.3f} {median['optimizer']:6.3f} | {mem_text}")
    print(f"load average: {meta['load_average_start'][0]:.2f} at the start, {meta['load_average_end'][0]:.2f} at the end")
    with open(args.output, "w") as handle:
        json.dump({"meta": meta, "results": results}, handle, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
