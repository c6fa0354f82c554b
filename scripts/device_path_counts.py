"""Operations, peak temporary memory and a roofline estimate of one LoFT-AdamW step on the device path, on the CPU.

The step runs on ``meta`` tensors (shapes, no data: what a GPU's values look like from the host), under the test
suite's :class:`tests.test_gpu_path.RooflineWatch`, which also refuses any host synchronisation. It prints, per
shape set and rank, the aten operations of a step on device tensors (operations on the CPU's step counts are not
counted), how many of them launch a kernel on a GPU (the others only make views), the most bytes its temporaries hold
at once, for the default ``memory_budget`` (256 MiB) or ``--budget-mib``, and two times to compare:

* ``host_launch_ms``: the launches at 5 and 10 us each, the host's side of the step;
* ``device_ms_at_peak``: each operation's bytes read and written over the memory bandwidth or its flops over the
  fp32 peak, whichever is larger, summed: a lower bound of the GPU's side (defaults: an H200's 4.8 TB/s and 67
  fp32 TFLOP/s without tensor cores, as the step's GEMMs run in full fp32).

Launches are queued without waiting, so the step is launch-bound only where the host's time exceeds the device's.
``--model-compiled`` models ``compile=True`` (which cannot run on meta tensors): each block-5 tile's elementwise step
is one stand-in operation with the fused kernel's traffic (it reads m~ and v~ and writes the ratio)::

    python scripts/device_path_counts.py                      # LLaMA-3-8B (32 x q, k, v, up, down) at r = 16, 64
    python scripts/device_path_counts.py --budget-mib 1024
    python scripts/device_path_counts.py --model-compiled
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from loft_peft.optim import kernels  # noqa: E402
from tests.test_gpu_path import RooflineWatch, _step_counts, llama3_8b_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--bandwidth-tbs", type=float, default=4.8, help="device memory bandwidth, TB/s")
    parser.add_argument("--fp32-tflops", type=float, default=67.0, help="fp32 peak without tensor cores, TFLOP/s")
    parser.add_argument("--model-compiled", action="store_true",
                        help="model compile=True: one pass per tile for block 5's elementwise step")
    args = parser.parse_args(argv)
    options = dict(memory_budget=args.budget_mib << 20)
    if args.model_compiled:
        # The fused kernel's traffic and launch: read m~ and v~, write the ratio into v~'s block.
        kernels._FUSED_RATIO[:] = [lambda first, second, eps, floored: torch.add(first, second, out=second)]
        options["compile"] = True
    sets = {"LLaMA-3-8B, 32 layers x (q, k, v, up, down)": llama3_8b_shapes,
            "8 x (14336 x 4096)": lambda rank: [(14336, 4096, rank)] * 8}
    for title, shapes in sets.items():
        for rank in args.ranks:
            # Steps 2 and 3: one with each factor moving, the state already made.
            watches = [_step_counts(shapes(rank), steps=s, **options,
                                    watch=RooflineWatch(args.bandwidth_tbs * 1e12, args.fp32_tflops * 1e12))
                       for s in (2, 3)]
            launches = [w.ops - w.views for w in watches]
            print(json.dumps({"shapes": title, "rank": rank, "budget_mib": args.budget_mib,
                              "model_compiled": args.model_compiled,
                              "ops_per_step": [w.ops for w in watches],
                              "kernel_launches_per_step": launches,
                              "peak_temporaries_mib": [round(w.peak / 2**20, 1) for w in watches],
                              "host_launch_ms": [[round(n * us / 1000, 1) for us in (5, 10)] for n in launches],
                              "device_ms_at_peak": [round(w.seconds * 1000, 1) for w in watches],
                              "device_gb_moved": [round(w.bytes / 1e9, 1) for w in watches],
                              "device_tflop": [round(w.flops / 1e12, 2) for w in watches]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
