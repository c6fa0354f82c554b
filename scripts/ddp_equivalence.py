#!/usr/bin/env python
"""LoFT on several processes against one process with the same global batch, step by step.

    python scripts/ddp_equivalence.py                                  # DDP, float64 then float32
    python scripts/ddp_equivalence.py --engine ddp fsdp2 --dtype float64
    python scripts/ddp_equivalence.py --optimizer adamw --dtype float32  # torch.optim.AdamW, for comparison

A small LLaMA-architecture model (random weights; LoFT on q, k, v, up and down, ``lm_head`` in ``modules_to_save``
so that the plain AdamW group takes part too) trains for ``--steps`` steps with effective-gradient clipping: once in
this process on the whole global batch of each step, and once on ``--processes`` processes, each on its share of the
same batch, launched with ``accelerate launch --config_file configs/accelerate_ddp.yaml`` on the CPU (gloo). With
``--engine ddp`` the model is wrapped by ``accelerator.prepare`` (DDP); with ``--engine fsdp2`` by
:func:`loft_peft.distributed.shard_frozen_base` (frozen base sharded, factors replicated). Midway each run saves a
checkpoint (adapter with ``save_pretrained``, optimizer ``state_dict``), and the other kind of run resumes from it.

Printed per step: whether every process holds bitwise the same trainable parameters and optimizer state, and how far
the multi-process parameters are from the single-process ones (the worst entry relative to its tensor's largest, and
the worst layer's ``B A`` in relative Frobenius norm). Run without ``--worker``; the launched processes run the same
file with ``--worker``.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("ddp", "fsdp2")
DTYPES = {"float64": torch.float64, "float32": torch.float32}

VOCAB, SEQ_LEN = 96, 16
GLOBAL_BATCH = 4
LR = 1e-2
# Chosen so that clipping is active in some steps and not in others (the norms of this run lie near 0.7-0.8).
MAX_GRAD_NORM = 0.76
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


# ================================================================================================= the experiment
def build_base(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype)


def build_model(dtype: torch.dtype):
    from peft import get_peft_model

    from loft_peft import LoftConfig

    base = build_base(dtype)
    torch.manual_seed(1)
    model = get_peft_model(base, LoftConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]))
    return model.to(dtype)


def load_model(dtype: torch.dtype, checkpoint: Path):
    from peft import PeftModel

    import loft_peft  # noqa: F401  (registers the LOFT type)

    return PeftModel.from_pretrained(build_base(dtype), checkpoint / "adapter", is_trainable=True).to(dtype)


def create_optimizer(model, kind: str = "loft"):
    """LoFT-AdamW, or for comparison ``torch.optim.AdamW`` on the same trainable parameters (the LoRA recipe)."""
    if kind == "adamw":
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    from loft_peft import create_loft_optimizer

    return create_loft_optimizer(model, lr=LR)


def clip(model, optimizer) -> torch.Tensor:
    """LoFT's effective-gradient clipping (block 6), or the plain norm clipping for ``torch.optim.AdamW``."""
    if hasattr(optimizer, "clip_grad_norm_"):
        return optimizer.clip_grad_norm_(MAX_GRAD_NORM)
    return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)


def global_batch(step: int) -> torch.Tensor:
    """The token ids of optimizer step ``step`` (1-based), the same in every process."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN), generator=generator)


def snapshot(model, optimizer, norm: torch.Tensor) -> dict:
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad},
        "state": copy.deepcopy(optimizer.state_dict()),
        "norm": norm.detach().clone(),
    }


def train(model, optimizer, steps, *, rank=0, world=1, forward=None, backward=None, device="cpu"):
    """Run the optimizer steps ``steps`` on this process's share of each global batch; yields (step, snapshot).

    ``model`` is the unwrapped LoFT model and ``optimizer`` the LoFT optimizer; ``forward`` (default: ``model``) is
    what runs the batch, e.g. the DDP wrapper, and ``backward`` (default: ``loss.backward()``) e.g.
    ``accelerator.backward``.
    """
    forward = forward or model
    local = GLOBAL_BATCH // world
    for step in steps:
        ids = global_batch(step)[rank * local:(rank + 1) * local].to(device)
        loss = forward(input_ids=ids, labels=ids).loss
        (backward or torch.Tensor.backward)(loss)
        norm = clip(model, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield step, snapshot(model, optimizer, norm)


def save_checkpoint(model, optimizer, directory: Path) -> None:
    model.save_pretrained(directory / "adapter")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def resume(dtype: torch.dtype, checkpoint: Path, kind: str = "loft"):
    model = load_model(dtype, checkpoint)
    optimizer = create_optimizer(model, kind)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    return model, optimizer


# ==================================================================================================== the worker
def worker(args: argparse.Namespace) -> None:
    """One launched process: per engine, a fresh run (checkpoint at --save-step) and a run resumed from --resume-from.

    Every process writes its snapshot of every step to ``--output-dir/<engine>/<phase>_rank<r>_step<k>.pt``.
    """
    from accelerate import Accelerator

    dtype = DTYPES[args.dtype]
    torch.set_num_threads(1)
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes

    def run(engine, model, optimizer, steps, out, phase, checkpoint=None):
        if engine == "ddp":
            wrapped, prepared = accelerator.prepare(model, optimizer)
            inner, forward, backward = prepared.optimizer, wrapped, accelerator.backward
        else:
            from loft_peft.distributed import shard_frozen_base

            shard_frozen_base(model)
            inner, forward, backward = optimizer, model, None
        for step, snap in train(model, inner, steps, rank=rank, world=world, forward=forward, backward=backward,
                                device=accelerator.device):
            torch.save(snap, out / f"{phase}_rank{rank}_step{step}.pt")
            if checkpoint is not None and step == args.save_step:
                if accelerator.is_main_process:
                    save_checkpoint(model, inner, checkpoint)
                accelerator.wait_for_everyone()
        if engine == "fsdp2":
            from torch.distributed.tensor import DTensor

            base = next(p for p in model.parameters() if not p.requires_grad and p.dim() == 2)
            local_rows = base.to_local().shape[0] if isinstance(base, DTensor) else base.shape[0]
            torch.save({"sharded": isinstance(base, DTensor), "rows": base.shape[0], "local_rows": local_rows},
                       out / f"{phase}_rank{rank}_layout.pt")

    for engine in args.engine:
        out = args.output_dir / engine
        out.mkdir(parents=True, exist_ok=True)
        model = build_model(dtype)
        run(engine, model, create_optimizer(model, args.optimizer), range(1, args.steps + 1), out, "fresh",
            checkpoint=out / "checkpoint")
        model, optimizer = resume(dtype, args.resume_from, args.optimizer)
        run(engine, model, optimizer, range(args.save_step + 1, args.steps + 1), out, "resumed")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def launch(args: argparse.Namespace, output_dir: Path, resume_from: Path) -> None:
    """``accelerate launch`` this file as the worker on ``args.processes`` CPU processes (gloo)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "configs" / "accelerate_ddp.yaml"),
        "--num_processes", str(args.processes),
        "--main_process_port", str(args.port),
        __file__, "--worker", "--engine", *args.engine, "--optimizer", args.optimizer, "--dtype", args.dtype,
        "--steps", str(args.steps), "--save-step", str(args.save_step),
        "--output-dir", str(output_dir), "--resume-from", str(resume_from),
    ]
    # ACCELERATE_USE_CPU makes accelerate's processes use gloo on the CPU even where a GPU is visible.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"the launched run failed (exit {result.returncode}):\n{result.stdout[-4000:]}"
                           f"\n{result.stderr[-8000:]}")


# ================================================================================================ the comparison
def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from _tensors(value, f"{prefix}/{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{prefix}/{i}")


def first_difference(a: dict, b: dict) -> str | None:
    """The first tensor (by path) that is not bitwise equal in two snapshots, or ``None``."""
    left, right = dict(_tensors(a)), dict(_tensors(b))
    if left.keys() != right.keys():
        return f"different entries: {sorted(left.keys() ^ right.keys())[:3]}"
    for key, tensor in left.items():
        if tensor.dtype != right[key].dtype or not torch.equal(tensor, right[key]):
            return key
    return None


def relative_difference(params: dict, reference: dict) -> float:
    """max over tensors of max|x - x_ref| / max|x_ref|: the worst entry, relative to its tensor's scale."""
    worst = 0.0
    for name, ref in reference.items():
        scale = ref.abs().max().item() or 1.0
        worst = max(worst, (params[name].double() - ref.double()).abs().max().item() / scale)
    return worst


def product_difference(params: dict, reference: dict) -> float:
    """max over LoFT layers of ||B A - B_ref A_ref||_F / ||B_ref A_ref||_F: how far the learned updates differ."""
    worst = 0.0
    for name in reference:
        if ".loft_B." not in name:
            continue
        a_name = name.replace(".loft_B.", ".loft_A.")
        delta = params[name].double() @ params[a_name].double()
        ref = reference[name].double() @ reference[a_name].double()
        worst = max(worst, ((delta - ref).norm() / ref.norm().clamp_min(1e-300)).item())
    return worst


def compare(engines=("ddp",), dtype: str = "float64", *, optimizer: str = "loft", processes: int = 2,
            steps: int = 6, save_step: int = 3, workdir: Path | None = None, port: int = 29531) -> dict:
    """Run both sides and measure them (one launch for all ``engines``); returns ``{engine: results}``.

    Each engine's results, as :func:`report` prints them: ``ranks_identical`` (a (phase, rank, step, first tensor that
    differs from rank 0's, or None) for every process but the first and every step), ``relative_difference`` and
    ``product_difference`` ({comparison: {step: value}}, see :func:`relative_difference` and
    :func:`product_difference`), ``norms`` (the single-process clipping norms by step) and, for FSDP2, ``layout``
    (per process: whether the first frozen base weight is sharded, and how many of its rows the process holds).
    """
    engines = tuple(engines)
    args = argparse.Namespace(engine=engines, optimizer=optimizer, dtype=dtype, processes=processes, steps=steps,
                              save_step=save_step, port=port)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="loft-ddp-"))
    torch_dtype = DTYPES[dtype]

    # One process, whole global batch; checkpoint midway for the launched runs to resume from.
    single_checkpoint = workdir / "single_checkpoint"
    model = build_model(torch_dtype)
    single = create_optimizer(model, optimizer)
    reference = {}
    for step, snap in train(model, single, range(1, steps + 1)):
        reference[step] = snap
        if step == save_step:
            save_checkpoint(model, single, single_checkpoint)
    launch(args, workdir / "launched", single_checkpoint)

    results = {}
    for engine in engines:
        output_dir = workdir / "launched" / engine

        def load(phase, rank, step):
            return torch.load(output_dir / f"{phase}_rank{rank}_step{step}.pt", weights_only=True)

        # One process resumed from the launched run's checkpoint.
        model, single = resume(torch_dtype, output_dir / "checkpoint", optimizer)
        resumed_single = dict(train(model, single, range(save_step + 1, steps + 1)))

        found: dict = {"ranks_identical": [], "relative_difference": {}, "product_difference": {},
                       "norms": {step: float(snap["norm"]) for step, snap in reference.items()}}

        def measure(key, step, params, reference_params):
            found["relative_difference"].setdefault(key, {})[step] = relative_difference(params, reference_params)
            found["product_difference"].setdefault(key, {})[step] = product_difference(params, reference_params)

        for phase, phase_steps in (("fresh", range(1, steps + 1)), ("resumed", range(save_step + 1, steps + 1))):
            key = f"{engine} vs single" if phase == "fresh" else f"{engine} resumed from single vs single"
            for step in phase_steps:
                first = load(phase, 0, step)
                for rank in range(1, processes):
                    found["ranks_identical"].append(
                        (phase, rank, step, first_difference(first, load(phase, rank, step))))
                measure(key, step, first["params"], reference[step]["params"])
        for step, snap in resumed_single.items():
            measure(f"single resumed from {engine} vs {engine}", step, snap["params"], load("fresh", 0, step)["params"])
        if engine == "fsdp2":
            found["layout"] = [torch.load(output_dir / f"fresh_rank{rank}_layout.pt", weights_only=True)
                               for rank in range(processes)]
        results[engine] = found
    return results


def report(engine: str, dtype: str, results: dict, optimizer: str = "loft") -> None:
    mismatches = [entry for entry in results["ranks_identical"] if entry[3] is not None]
    print(f"\n{engine}, {dtype}, {'LoFT-AdamW' if optimizer == 'loft' else 'torch.optim.AdamW on the factors'}:")
    print(f"  processes bitwise identical (parameters and optimizer state) after every step: {not mismatches}"
          + (f" (first mismatch: {mismatches[0]})" if mismatches else ""))
    norms = results["norms"]
    print("  norm clipped by step (LoFT: the effective-gradient norm), clip at %.2f: %s" % (
        MAX_GRAD_NORM, ", ".join(f"{step}: {value:.3g}" for step, value in norms.items())))
    for name, by_step in results["relative_difference"].items():
        print(f"  {name}, by step:")
        print("    worst entry, relative to its tensor's largest: "
              + ", ".join(f"{step}: {value:.1e}" for step, value in by_step.items()))
        print("    worst layer's B A, relative Frobenius:           "
              + ", ".join(f"{step}: {value:.1e}" for step, value in results["product_difference"][name].items()))
    if "layout" in results:
        print("  first frozen base weight: " + ", ".join(
            f"rank {i}: {'sharded' if entry['sharded'] else 'whole'}, {entry['local_rows']} of {entry['rows']} rows"
            for i, entry in enumerate(results["layout"])))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=ENGINES, nargs="+", default=["ddp"])
    parser.add_argument("--optimizer", choices=("loft", "adamw"), default="loft",
                        help="loft, or adamw: torch.optim.AdamW on the same factors, for comparison")
    parser.add_argument("--dtype", choices=sorted(DTYPES), nargs="+", default=["float64", "float32"])
    parser.add_argument("--processes", type=int, default=2, help="processes (a divisor of the global batch, 4)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-step", type=int, default=3)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--resume-from", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if GLOBAL_BATCH % args.processes:
        parser.error(f"--processes must divide the global batch ({GLOBAL_BATCH})")
    if args.worker:
        args.dtype = args.dtype[0]
        worker(args)
        return
    for dtype in args.dtype:
        results = compare(args.engine, dtype, optimizer=args.optimizer, processes=args.processes, steps=args.steps,
                          save_step=args.save_step, port=args.port)
        for engine, found in results.items():
            report(engine, dtype, found, args.optimizer)


if __name__ == "__main__":
    main()
