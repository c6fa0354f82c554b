"""The GPU checks: LoFT-AdamW on CUDA against the CPU, with no host synchronisation, then whole-step time and memory.

Run it on a machine with a CUDA GPU, in one go (a few minutes)::

    python scripts/gpu_check.py --output gpu_check.json

1. **Correctness on CUDA.** A few LLaMA-shaped factor pairs step 20 times on CUDA (the device path) and on the CPU
   (the C kernels where they build), from the same start and gradients; the largest relative difference is printed.
   The CUDA steps run under ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation inside
   ``clip_grad_norm_`` or ``step`` fails the check. A NaN gradient must be skipped on the device (factors unchanged,
   ``skipped_steps == 1``), and the run must go on.
2. **Whole training step** (forward, backward, clipping at 1.0, optimizer step) of a LLaMA-shaped model with random
   weights, ``--layers`` layers of LLaMA-3-8B's sizes (hidden 4096, MLP 14336, 32 heads, 8 KV heads), in bf16, batch
   ``--batch`` x ``--seq`` tokens: LoFT (``create_loft_optimizer``) against LoRA (PEFT, ``lora_alpha = 2r``) with
   ``torch.optim.AdamW(fused=True)`` and ``clip_grad_norm_``, at r = 16 and r = 64, adapters on q/k/v/up/down_proj;
   and LoFT with ``compile=True`` (block 5's elementwise step fused by ``torch.compile``; its compilation falls in
   the warm-up steps; ``--no-compiled`` leaves it out).
   Median of ``--steps`` timed steps after 3 warm-up steps, with ``torch.cuda.synchronize()`` around each; peak
   memory (``max_memory_allocated``) and the optimizer's state bytes against the model's bf16 weights.
3. **QLoFT**: the same model saved once and loaded back in 4-bit NF4 through ``load_qloft_model`` (r = 16), against
   QLoRA (PEFT's ``prepare_model_for_kbit_training`` + LoRA).

Targets (README, Performance): LoFT <= 1.15x LoRA's step time at r = 16, <= 1.5x at r = 64; the optimizer's state
and temporaries within 10% of the model's bf16 weights at r = 16. ``--device cpu --tiny`` runs the same code on a
small model on the CPU, to check the script itself (the suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from loft_peft import LoftConfig, create_loft_optimizer  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def correctness(device: str, tiny: bool) -> dict:
    """Step the same factor pairs on ``device`` and on the CPU; returns the largest relative difference."""
    shapes = ([(64, 48, 4), (64, 48, 4), (48, 96, 8)] if tiny
              else [(4096, 4096, 16), (1024, 4096, 16), (14336, 4096, 16)])
    generator = torch.Generator().manual_seed(0)
    starts = []
    for out_features, in_features, rank in shapes:
        starts += [torch.randn(out_features, rank, generator=generator) * 0.02,
                   torch.randn(rank, in_features, generator=generator) / in_features**0.5]
    grads = [[torch.randn(p.shape, generator=generator) * 1e-3 for p in starts] for _ in range(20)]
    grads[7][1][0, 0] = float("nan")  # step 7 must be skipped on both
    results = {}
    for where in ("cpu", device):
        params = [torch.nn.Parameter(p.clone().to(where)) for p in starts]
        optimizer = create_loft_optimizer_from_pairs(params, lr=1e-3)
        for index, step_grads in enumerate(grads):
            for p, g in zip(params, step_grads):
                p.grad = g.to(where)
            before = [p.detach().clone() for p in params] if index == 7 else None
            if where == "cuda":
                torch.cuda.set_sync_debug_mode("error")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # the NaN step's warning: expected
                    optimizer.clip_grad_norm_(1.0)
                    optimizer.step()
                    if before is not None:
                        skipped = optimizer.last_step_was_skipped()
            finally:
                if where == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            if before is not None:
                unchanged = all(torch.equal(b, p.detach()) for b, p in zip(before, params))
                if not (skipped and unchanged):
                    raise SystemExit(f"gpu_check: the NaN step was not skipped cleanly on {where}")
        results[where] = ([p.detach().cpu() for p in params], optimizer.backend, optimizer.skipped_steps)
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(results[device][0], results["cpu"][0]))
    return {"largest_relative_difference": worst, "backend": results[device][1], "cpu_backend": results["cpu"][1],
            "skipped_steps": results[device][2]}


def create_loft_optimizer_from_pairs(params: list[torch.nn.Parameter], lr: float):
    from loft_peft import LoftAdamW

    return LoftAdamW([{"params": params, "loft": True}], lr=lr)


def _llama(tiny: bool, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _adapted(method: str, rank: int, device: str, tiny: bool, layers: int, base_path: str | None = None):
    """(model, optimizer, clip) for ``method``: ``"lora"``, ``"loft"`` or ``"loft-compiled"`` (``compile=True``)."""
    from peft import LoraConfig, get_peft_model

    if base_path is not None:  # 4-bit base
        if method == "loft":
            from loft_peft import load_qloft_model

            model = load_qloft_model(base_path, LoftConfig(r=rank, target_modules=TARGETS),
                                     gradient_checkpointing=False, device_map={"": device})
        else:
            from peft import prepare_model_for_kbit_training
            from transformers import AutoModelForCausalLM

            from loft_peft.quantization import bnb_4bit_config

            model = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=bnb_4bit_config(),
                                                         device_map={"": device})
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    else:
        model = _llama(tiny, layers).to(device=device, dtype=torch.bfloat16)
        config = (LoftConfig(r=rank, target_modules=TARGETS) if method.startswith("loft")
                  else LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
        model = get_peft_model(model, config)
    if method.startswith("loft"):
        optimizer = create_loft_optimizer(model, lr=1e-4, compile=method == "loft-compiled")

        def clip():
            optimizer.clip_grad_norm_(1.0)
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device == "cuda")

        def clip():
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    return model, optimizer, clip


def _state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def time_steps(method: str, rank: int, args, base_path: str | None = None) -> dict:
    device = args.device
    model, optimizer, clip = _adapted(method, rank, device, args.tiny, args.layers, base_path)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(3 + args.steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=base_path is None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= 3:
            times.append(time.perf_counter() - start)
    weights = sum(p.numel() * 2 for p in model.parameters())  # as bf16
    result = {"method": method, "rank": rank, "quantized": base_path is not None,
              "seconds_per_step": statistics.median(times), "optimizer_state_bytes": _state_bytes(optimizer),
              "model_bf16_bytes": weights}
    if device == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    if method.startswith("loft"):
        result["backend"] = optimizer.backend
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="a small model (to check the script on the CPU)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--no-qloft", action="store_true")
    parser.add_argument("--no-compiled", action="store_true", help="leave out LoFT with compile=True")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible; --device cpu --tiny checks the script itself")
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "torch": torch.__version__, "correctness": correctness(args.device, args.tiny), "steps": []}
    print(json.dumps(report["correctness"]), flush=True)
    methods = ("lora", "loft") if args.no_compiled else ("lora", "loft", "loft-compiled")
    for rank in args.ranks:
        rows = [time_steps(method, rank, args) for method in methods]
        for row in rows[1:]:
            row["vs_lora"] = row["seconds_per_step"] / rows[0]["seconds_per_step"]
            row["state_vs_bf16_weights"] = row["optimizer_state_bytes"] / row["model_bf16_bytes"]
        report["steps"] += rows
        print(json.dumps(rows), flush=True)
    if not args.no_qloft and args.device == "cuda":
        with tempfile.TemporaryDirectory() as folder:
            _llama(args.tiny, args.layers).to(torch.bfloat16).save_pretrained(folder)
            pair = [time_steps(method, args.ranks[0], args, base_path=folder) for method in ("lora", "loft")]
        pair[1]["vs_lora"] = pair[1]["seconds_per_step"] / pair[0]["seconds_per_step"]
        report["steps"] += pair
        print(json.dumps(pair), flush=True)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=1)
    for row in report["steps"]:
        if row["method"].startswith("loft"):
            kind = "QLoFT" if row["quantized"] else "LoFT"
            kind += " compile=True" if row["method"] == "loft-compiled" else ""
            print(f"{kind} r={row['rank']}: {row['vs_lora']:.2f}x LoRA's step "
                  f"({row['seconds_per_step'] * 1e3:.1f} ms), optimizer state "
                  f"{row['optimizer_state_bytes'] / row['model_bf16_bytes']:.1%} of the bf16 weights"
                  + (f", peak {row['peak_memory_bytes'] / 2**30:.2f} GiB" if "peak_memory_bytes" in row else ""))
    print(f"correctness: largest relative difference {report['correctness']['largest_relative_difference']:.2e} "
          f"(backend {report['correctness']['backend']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
