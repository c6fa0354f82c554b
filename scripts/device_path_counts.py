"""Operations and peak temporary memory of one LoFT-AdamW step on the device path, counted on the CPU.

The step runs on ``meta`` tensors (shapes, no data: what a GPU's values look like from the host), under the test
suite's :class:`tests.test_gpu_path.LiveBytes` watch, which also refuses any host synchronisation. It prints, per
shape set and rank, the aten operations of a step on device tensors (operations on the CPU's step counts are not
counted), how many of them launch a kernel on a GPU (5-10 us of host time each; the others only make views), and the
most bytes its temporaries hold at once, for the default ``memory_budget`` (256 MiB) or ``--budget-mib``::

    python scripts/device_path_counts.py                      # LLaMA-3-8B (32 x q, k, v, up, down) at r = 16, 64
    python scripts/device_path_counts.py --budget-mib 1024
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.test_gpu_path import _step_counts, llama3_8b_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--budget-mib", type=int, default=256)
    args = parser.parse_args(argv)
    sets = {"LLaMA-3-8B, 32 layers x (q, k, v, up, down)": llama3_8b_shapes,
            "8 x (14336 x 4096)": lambda rank: [(14336, 4096, rank)] * 8}
    for title, shapes in sets.items():
        for rank in args.ranks:
            # Steps 2 and 3: one with each factor moving, the state already made.
            watches = [_step_counts(shapes(rank), steps=s, memory_budget=args.budget_mib << 20) for s in (2, 3)]
            print(json.dumps({"shapes": title, "rank": rank, "budget_mib": args.budget_mib,
                              "ops_per_step": [w.ops for w in watches],
                              "kernel_launches_per_step": [w.ops - w.views for w in watches],
                              "peak_temporaries_mib": [round(w.peak / 2**20, 1) for w in watches]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
