"""Per-layer optimizer step time and memory: LoFT-AdamW (full, simple) against torch AdamW.

For each layer shape (out x in) and rank r, one LoFT factor pair (B: out x r, A: r x in) and its gradients are stepped
by

* ``loft``: ``LoftAdamW`` (Algorithm 1, cross-term second moments);
* ``loft-simple``: ``LoftAdamW(variant="simple")``;
* ``adamw-factors``: ``torch.optim.AdamW`` on the two factors (what LoRA trains with);
* ``adamw-full``: ``torch.optim.AdamW`` on a full out x in weight (full fine-tuning of the layer);
* with ``--compile``, also ``loft-compiled``: ``LoftAdamW(compile=True)``.

Timing: every round times two consecutive steps of each method (for LoFT one moves B, the other A) in turn, in one
process, rotating the order. A CPU's speed drifts (frequency, other processes), so ratios are taken within a round
and the median over rounds is reported, next to each method's median time. ``5/W`` is block 5 (the rebuilt full-space
update, ``kernels.projected_adam_update``) timed alone on LoFT's state right after its steps, over AdamW(W)'s step in
the same round: the part of LoFT's step that the m x n work takes.

Memory: ``state`` is the bytes of the optimizer state tensors per layer; ``bound`` is the issue's budget, LoRA's
AdamW state plus (m+n) r (r+1)/2 floats of cross terms and (m+n) r floats of previous factors. ``scratch`` is the
peak resident memory a step adds beyond parameters, gradients and state, measured in a fresh child process
(``ru_maxrss``), and ``largest`` the largest single tensor allocated during a step (PyTorch profiler).

On CPUs LoFT runs through the fused C kernels of ``loft_peft.optim.native`` where they build; ``--no-native`` times
the PyTorch operations instead (batched ``torch.bmm`` GEMMs). ``--avx2`` builds the
kernels as for a CPU without AVX-512 (``-mno-avx512f``, 8-float vectors); to hold PyTorch (and AdamW) to the same
instructions, run it under ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``.

Run with all cores (leave OMP_NUM_THREADS unset). Examples::

    python scripts/bench_optimizer.py                                   # the full table, JSON in bench_optimizer.json
    python scripts/bench_optimizer.py --shapes 1024x512 --ranks 8,16 --rounds 200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from loft_peft.optim import kernels, maths, native  # noqa: E402
from loft_peft.optim.adamw import LoftAdamW  # noqa: E402

METHODS = ("loft", "loft-simple", "adamw-factors", "adamw-full")
COMPILED = "loft-compiled"


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the system (``mallopt``), for every method alike.

    By default glibc unmaps a freed block at the top of its heap once it exceeds a threshold that adapts as the
    process runs, so whether a step's multi-megabyte temporaries are faulted in afresh (a page fault per 4 KB,
    milliseconds per step here) depends on what ran before: a ``torch.optim.AdamW`` step on a 1024 x 512 weight
    was measured at 1.5 ms and, in the same process, at 5.3 ms with ~1000 page faults per step. Fixed thresholds
    remove that lottery; jemalloc or tcmalloc (often preloaded for CPU training) behave similarly.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def make_layer(method: str, out_features: int, in_features: int, rank: int, seed: int = 0):
    """Parameters with gradients and the optimizer for one method; B is non-zero, as after the first steps."""
    generator = torch.Generator().manual_seed(seed)
    if method == "adamw-full":
        weight = nn.Parameter(torch.randn(out_features, in_features, generator=generator) * 0.02)
        weight.grad = torch.randn(out_features, in_features, generator=generator)
        return [weight], torch.optim.AdamW([weight], lr=1e-4)
    b_param = nn.Parameter(torch.randn(out_features, rank, generator=generator) * 0.02)
    a_param = nn.Parameter(torch.randn(rank, in_features, generator=generator) / in_features**0.5)
    b_param.grad = torch.randn(out_features, rank, generator=generator)
    a_param.grad = torch.randn(rank, in_features, generator=generator)
    if method == "adamw-factors":
        return [b_param, a_param], torch.optim.AdamW([b_param, a_param], lr=1e-4)
    variant = "simple" if method == "loft-simple" else "full"
    optimizer = LoftAdamW(
        [{"params": [b_param, a_param], "loft": True}], lr=1e-4, variant=variant, compile=method == COMPILED
    )
    return [b_param, a_param], optimizer


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim() > 0)


def budget_bytes(out_features: int, in_features: int, rank: int) -> int:
    """The issue's bound: LoRA's AdamW state + (m+n) r(r+1)/2 cross terms + (m+n) r previous factors, fp32."""
    rows = out_features + in_features
    return 4 * (2 * rows * rank + rows * maths.packed_size(rank) + rows * rank)


def largest_allocation(optimizer: torch.optim.Optimizer) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        optimizer.step()
    return max((event.cpu_memory_usage for event in profile.events()), default=0)


def peak_scratch(method: str, out_features: int, in_features: int, rank: int) -> int:
    """Peak resident bytes a step adds beyond parameters, gradients and state, in a fresh process."""
    command = [sys.executable, __file__, "--child-peak", f"{method}:{out_features}:{in_features}:{rank}"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(json.loads(result.stdout.strip().splitlines()[-1])["scratch"])


def _child_peak(spec: str) -> None:
    """Resident memory a step adds beyond parameters, gradients and state: three steps from a fresh optimizer,
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the resident size before them and the
    state they create."""
    method, out_features, in_features, rank = spec.split(":")
    # A few steps on a small layer first, so that one-off initialisation (thread pools, oneDNN's generated kernels,
    # library buffers) is not counted as the big layer's scratch.
    _, warm_up = make_layer(method, 64, 48, min(int(rank), 8))
    for _ in range(3):
        warm_up.step()
    params, optimizer = make_layer(method, int(out_features), int(in_features), int(rank))
    baseline = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    for _ in range(3):
        optimizer.step()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"scratch": max(0, peak - baseline - state_bytes(optimizer))}))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def block5_timer(params: list[nn.Parameter], optimizer: LoftAdamW):
    """A function timing block 5 alone (``kernels.projected_adam_update``) on the LoFT pair's current state: the mean
    of one call for each factor (the step calls it for the moving one, inside one native call where the C kernels run).
    """
    b_param, a_param = params
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    workspace = kernels.Workspace()

    def timed() -> float:
        u, v = b_param.detach().unsqueeze(0), a_param.detach().T.unsqueeze(0)
        calls = []
        for x, state, y in ((u, optimizer.state[b_param], v), (v, optimizer.state[a_param], u)):
            inputs = (x, state["exp_avg"].unsqueeze(0), state["cross_sq"].unsqueeze(0), y, kernels.gram_pinv(y))
            calls.append(inputs)
        tic = time.perf_counter()
        for inputs in calls:
            kernels.projected_adam_update(
                *inputs, lr=group["lr"], decay=1.0, bias_correction1=1.0 - beta1, bias_correction2=1.0 - beta2,
                eps=group["eps"], floor=maths.second_moment_floor(beta1, beta2), workspace=workspace,
            )  # fmt: skip
        return (time.perf_counter() - tic) / len(calls)

    return timed


def time_config(
    out_features: int, in_features: int, rank: int, rounds: int, budget_s: float, methods: tuple[str, ...] = METHODS
) -> dict:
    setups = {method: make_layer(method, out_features, in_features, rank) for method in methods}
    for _, optimizer in setups.values():  # warm-up: state creation, oneDNN kernel generation, allocator growth
        for _ in range(4):
            optimizer.step()
    block5 = block5_timer(*setups["loft"])
    block5()
    times: dict[str, list[float]] = {method: [] for method in methods}
    ratios: dict[str, list[float]] = {method: [] for method in methods}
    rebuild: list[float] = []  # block 5 alone on LoFT's state (kernels.projected_adam_update), per call
    rebuild_ratios: list[float] = []
    started = time.perf_counter()
    for round_index in range(rounds):
        order = methods[round_index % len(methods) :] + methods[: round_index % len(methods)]
        this_round = {}
        for method in order:
            optimizer = setups[method][1]
            tic = time.perf_counter()
            optimizer.step()
            optimizer.step()
            this_round[method] = (time.perf_counter() - tic) / 2
            if method == "loft":
                rebuild.append(block5())
        for method in methods:
            times[method].append(this_round[method])
            ratios[method].append(this_round[method] / this_round["adamw-full"])
        if rebuild:
            rebuild_ratios.append(rebuild[-1] / this_round["adamw-full"])
        if time.perf_counter() - started > budget_s and round_index >= 4:
            break
    record = {
        "shape": [out_features, in_features],
        "rank": rank,
        "rounds": len(times["loft"]),
        "median_ms": {m: 1e3 * statistics.median(t) for m, t in times.items()},
        "min_ms": {m: 1e3 * min(t) for m, t in times.items()},
        "loft_block5_median_ms": 1e3 * statistics.median(rebuild),
        "loft_block5_ratio_to_adamw_full": statistics.median(rebuild_ratios),
        "ratio_to_adamw_full": {m: statistics.median(r) for m, r in ratios.items()},
        "ratio_to_adamw_factors": {
            m: statistics.median(a / b for a, b in zip(times[m], times["adamw-factors"])) for m in methods
        },
        "state_bytes": {m: state_bytes(setups[m][1]) for m in methods},
        "budget_bytes": budget_bytes(out_features, in_features, rank),
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1024x512,4096x4096,4096x14336", help="comma-separated OUTxIN")
    parser.add_argument("--ranks", default="1,4,8,16,32", help="comma-separated ranks")
    parser.add_argument("--rounds", type=int, default=60, help="timing rounds per configuration (at most)")
    parser.add_argument("--seconds", type=float, default=20.0, help="time budget per configuration")
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurements")
    parser.add_argument("--no-native", action="store_true", help="use PyTorch operations instead of the C kernels")
    parser.add_argument("--avx2", action="store_true", help="build the C kernels without AVX-512 (with --no-memory)")
    parser.add_argument("--compile", action="store_true", help="also time LoftAdamW(compile=True)")
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's adaptive trimming on (see keep_freed_memory)"
    )
    parser.add_argument("--output", default="bench_optimizer.json", help="where to write the JSON results")
    parser.add_argument("--child-peak", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_peak:
        _child_peak(args.child_peak)
        return
    if args.no_native:
        native.USE_NATIVE = False
        os.environ["LOFT_PEFT_NATIVE"] = "0"  # and in the memory-measuring child processes
    if args.avx2:
        if not args.no_memory:
            parser.error("--avx2 is for timings: add --no-memory")
        native.FLAGS = native.FLAGS + ("-mno-avx512f",)
        native.library.cache_clear()
    fixed_malloc = False if args.default_malloc else keep_freed_memory()
    torch.manual_seed(0)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "native": native.enabled(),
        "native_flags": list(native.FLAGS),
        "isa_environment": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
        "fixed_malloc_thresholds": fixed_malloc,
        "load_average_start": os.getloadavg(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }
    print(f"torch {meta['torch']}, {meta['threads']} threads, native kernels: {meta['native']}, "
          f"fixed malloc thresholds: {fixed_malloc}, load average {meta['load_average_start'][0]:.2f}")
    methods = METHODS + ((COMPILED,) if args.compile else ())
    compiled = COMPILED in methods
    header = (
        f"{'shape':>11} {'r':>3} | {'LoFT':>8} {'simple':>8} {'AdamW(BA)':>9} {'AdamW(W)':>9} ms | "
        f"{'LoFT/W':>6} {'5/W':>5} {'simp/W':>6}{' comp/W' if compiled else ''} {'LoFT/BA':>7} | "
        f"{'state KB':>9} {'bound KB':>9} {'scratch MB':>10} {'largest MB':>10}"
    )
    print(header)
    print("-" * len(header))
    records = []
    for shape in args.shapes.split(","):
        out_features, in_features = (int(x) for x in shape.lower().split("x"))
        for rank in (int(r) for r in args.ranks.split(",")):
            record = time_config(out_features, in_features, rank, args.rounds, args.seconds, methods)
            if not args.no_memory:
                record["scratch_bytes"] = {m: peak_scratch(m, out_features, in_features, rank) for m in METHODS}
                _, optimizer = make_layer("loft", out_features, in_features, rank)
                optimizer.step()
                record["largest_allocation_bytes"] = largest_allocation(optimizer)
            records.append(record)
            t, q = record["median_ms"], record["ratio_to_adamw_full"]
            scratch = record.get("scratch_bytes", {}).get("loft")
            largest = record.get("largest_allocation_bytes")
            print(
                f"{shape:>11} {rank:>3} | {t['loft']:8.3f} {t['loft-simple']:8.3f} {t['adamw-factors']:9.3f} "
                f"{t['adamw-full']:9.3f}    | {q['loft']:6.2f} {record['loft_block5_ratio_to_adamw_full']:5.2f} "
                f"{q['loft-simple']:6.2f}"
                f"{f' {q[COMPILED]:6.2f}' if compiled else ''} {record['ratio_to_adamw_factors']['loft']:7.2f} | "
                f"{record['state_bytes']['loft'] / 1024:9.1f} {record['budget_bytes'] / 1024:9.1f} "
                f"{'-' if scratch is None else f'{scratch / 2**20:.1f}':>10} "
                f"{'-' if largest is None else f'{largest / 2**20:.1f}':>10}",
                flush=True,
            )
    meta["load_average_end"] = os.getloadavg()
    print(f"load average at the end: {meta['load_average_end'][0]:.2f}")
    with open(args.output, "w") as handle:
        json.dump({"meta": meta, "results": records}, handle, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
