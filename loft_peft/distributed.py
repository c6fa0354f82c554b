"""LoFT on several processes: which data-parallel engines keep it exact, and the small pieces they need.

The LoFT optimizer steps each layer's two factors together: every step reads the whole ``loft_B`` (m x r) and
``loft_A`` (r x n) of a layer, their Gram matrices and each other. How the engines that ``accelerate launch`` and
``torchrun`` offer relate to that:

* **DDP** (``distributed_type: MULTI_GPU`` in an accelerate config, or plain ``torchrun``): every process holds the
  whole model and DDP averages the gradients during the backward, before ``optimizer.step()``. Every process then runs
  the same LoFT step on the same numbers, so factors and optimizer state stay identical on all processes, and the run
  equals one process with the same global batch (up to the order in which the all-reduce adds). Nothing to do.
* **FSDP2** (``fully_shard``, ``fsdp_version: 2``): the frozen base weights, which are what is large, are sharded; the
  LoFT factors and every other trainable parameter are left out of the sharding (``ignored_params``), stay whole on
  every process, and have their gradients averaged by a hook, as DDP would. Data parallelism for the adapter,
  sharding for the base: the optimizer runs unchanged and exact, with no collective inside its maths. Replicating the
  adapter costs O((m + n) r) per layer for the factors and O((m + n) r^2) for their state, against m n for the base
  weight. (Sharding the factors by rows would not take communication out of the step either: the projected Adam
  direction of block 5 sums over every row of the other factor, so each process would need all of it anyway.)
  :func:`shard_frozen_base` does all of this for a plain PyTorch loop. Under ``accelerate``, set
  ``fsdp_ignored_modules`` to :data:`FSDP_IGNORED_MODULES` (``configs/accelerate_fsdp.yaml`` does;
  :func:`keep_trainable_parameters_replicated` does it for ``LoftTrainer``) and call
  :func:`average_gradients_across_processes` on the prepared model (``LoftCallback`` does).
* **DeepSpeed ZeRO** (any stage) and **FSDP1** flatten parameters into 1-D buffers (FSDP1 with
  ``use_orig_params=True`` too: each parameter becomes a 1-D view of this process's shard), so no process sees a
  layer's pair any more. They are refused with a ``ValueError`` naming DDP and FSDP2 (:func:`check_distributed_setup`,
  :func:`check_factor_layout`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

SUPPORTED = (
    "DDP (the default of `accelerate launch --multi_gpu` and `torchrun`) or FSDP2 (`fsdp_version: 2`, with the "
    "LoFT factors kept out of the sharding: see configs/accelerate_fsdp.yaml)"
)

# accelerate's ``fsdp_ignored_modules`` (a regular expression, full-matched against module names): the modules
# holding trainable parameters in a LoFT model, i.e. every layer's ``loft_A`` / ``loft_B`` ParameterDict and the
# trainable copies that ``modules_to_save`` makes. accelerate moves the matched modules to the device itself.
FSDP_IGNORED_MODULES = r"(.*\.)?(loft_A|loft_B|modules_to_save\.[^.]+)"

# Set on a parameter whose gradient :func:`average_gradients_across_processes` averages.
_AVERAGED = "_loft_grad_averaged"
# Where :func:`check_factor_layout` keeps the layout it last accepted, on the optimizer.
_CHECKED = "_loft_checked_layout"


# ============================================================================================ what accelerate runs
def _accelerate_state() -> Any | None:
    """accelerate's ``AcceleratorState`` if an ``Accelerator`` (or a ``Trainer``) has set it up, else ``None``.

    Never creates it: ``AcceleratorState()`` on an uninitialised state would initialise one.
    """
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return None
    if not getattr(AcceleratorState, "_shared_state", None):
        return None
    return AcceleratorState()


def _distributed_type(state: Any) -> str:
    kind = getattr(state, "distributed_type", "NO")
    return str(getattr(kind, "value", kind))


def _fsdp_version(state: Any) -> int:
    return int(getattr(getattr(state, "fsdp_plugin", None), "fsdp_version", 1) or 1)


def is_fsdp2(state: Any | None = None) -> bool:
    """Whether accelerate's state (default: the current one, if any) runs FSDP2."""
    state = _accelerate_state() if state is None else state
    return state is not None and _distributed_type(state) == "FSDP" and _fsdp_version(state) == 2


def check_distributed_setup(state: Any | None = None) -> None:
    """Refuse the accelerate set-ups under which the LoFT optimizer would not see whole factor pairs.

    Args:
        state: an ``AcceleratorState`` (or anything with its ``distributed_type``, ``deepspeed_plugin`` and
            ``fsdp_plugin``); default: the current one, and nothing is checked when there is none.

    Raises:
        ValueError: DeepSpeed (any ZeRO stage) or FSDP1, naming DDP and FSDP2 instead.
    """
    state = _accelerate_state() if state is None else state
    if state is None:
        return
    kind = _distributed_type(state)
    if kind == "DEEPSPEED":
        stage = getattr(getattr(state, "deepspeed_plugin", None), "zero_stage", None)
        where = f"DeepSpeed ZeRO stage {stage}" if stage is not None else "DeepSpeed"
        raise ValueError(
            f"LoFT cannot train under {where}: DeepSpeed flattens each parameter group into one 1-D buffer (and ZeRO "
            "partitions it across processes), so the optimizer no longer sees each layer's (loft_B, loft_A) pair and "
            f"would run a different algorithm. Use {SUPPORTED}."
        )
    if kind == "FSDP" and _fsdp_version(state) == 1:
        raise ValueError(
            "LoFT cannot train under FSDP1: it flattens parameters into FlatParameters (with use_orig_params=True, "
            "into 1-D views of each process's shard), so the optimizer no longer sees each layer's (loft_B, loft_A) "
            f"pair. Use {SUPPORTED}: in the accelerate config, set `fsdp_version: 2`."
        )


def keep_trainable_parameters_replicated(state: Any | None = None) -> bool:
    """Under accelerate's FSDP2, leave the LoFT factors out of the sharding, unless the config already chose.

    Sets ``fsdp_plugin.ignored_modules`` to :data:`FSDP_IGNORED_MODULES` when it is unset. Call it before the model is
    prepared (``LoftTrainer`` does, in its constructor). Returns whether it set it.

    Raises:
        ValueError: ``fsdp_cpu_ram_efficient_loading`` is on. accelerate then moves the model to the meta device
            before sharding it, which makes new parameter objects, so the ignored ones are sharded after all; and
            the flag cannot be turned off here, because it already made ``from_pretrained`` load the weights on the
            first process only.
    """
    state = _accelerate_state() if state is None else state
    if not is_fsdp2(state):
        return False
    plugin = state.fsdp_plugin
    if getattr(plugin, "cpu_ram_efficient_loading", False):
        raise ValueError(
            "LoFT under FSDP2 needs `fsdp_cpu_ram_efficient_loading: false` in the accelerate config: with it on, "
            "accelerate shards the LoFT factors even when they are listed in fsdp_ignored_modules (see "
            "configs/accelerate_fsdp.yaml)."
        )
    if plugin.ignored_modules is not None:
        return False
    plugin.ignored_modules = FSDP_IGNORED_MODULES
    return True


# ======================================================================================== the optimizer's guard
def _is_dtensor(tensor: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def check_factor_layout(optimizer: torch.optim.Optimizer) -> None:
    """Refuse to step parameters that a data-parallel engine flattened, sharded or left unsynchronised.

    Meant to run at the start of every ``step()`` and norm computation: engines change the optimizer's parameters
    after it was built (accelerate swaps in FSDP's parameters, DeepSpeed its flat partitions, FSDP1 reshapes them in
    place), so the check made at construction no longer holds. The layout it accepted is remembered on the optimizer,
    so a step with unchanged parameters costs one pass over them.

    Raises:
        ValueError: a factor group does not hold 2-D ``(loft_B, loft_A)`` pairs (flattened by DeepSpeed or FSDP1); a
            trainable parameter is a sharded DTensor (FSDP2 without ``ignored_params`` for it); or, under
            accelerate's FSDP2, a replicated trainable parameter has no gradient averaging.
    """
    layout = tuple(
        (id(p), tuple(p.shape), type(p), getattr(p, _AVERAGED, False))
        for group in optimizer.param_groups
        for p in group["params"]
    )
    if optimizer.__dict__.get(_CHECKED) == layout:
        return
    for group in optimizer.param_groups:
        params = group["params"]
        if group.get("loft"):
            if len(params) % 2 or any(p.dim() != 2 for p in params) or any(
                b.shape[1] != a.shape[0] for b, a in zip(params[0::2], params[1::2])
            ):
                shapes = ", ".join(str(tuple(p.shape)) for p in params[:4])
                raise ValueError(
                    "The LoFT optimizer's factor group no longer holds 2-D (loft_B, loft_A) pairs (first shapes: "
                    f"{shapes}): a data-parallel engine flattened or regrouped the parameters after the optimizer was "
                    "built (DeepSpeed ZeRO and FSDP1 do), and stepping them would run a different algorithm. Use "
                    f"{SUPPORTED}."
                )
        for p in params:
            if _is_dtensor(p) and any(not placement.is_replicate() for placement in p.placements):
                raise ValueError(
                    f"A trainable parameter of shape {tuple(p.shape)} is sharded by FSDP2 ({p.placements}); LoFT needs "
                    "every trainable parameter whole on every process. Keep them out of the sharding: "
                    "`loft_peft.distributed.shard_frozen_base(model)` in a PyTorch loop, or `fsdp_ignored_modules: "
                    f"'{FSDP_IGNORED_MODULES}'` with `fsdp_cpu_ram_efficient_loading: false` in the accelerate "
                    "config (configs/accelerate_fsdp.yaml)."
                )
    if is_fsdp2():
        unsynced = [p for group in optimizer.param_groups for p in group["params"]
                    if not _is_dtensor(p) and not getattr(p, _AVERAGED, False)]
        if unsynced:
            raise ValueError(
                f"{len(unsynced)} trainable parameter(s) are kept whole by FSDP2 but nothing averages their gradients "
                "across processes, so each process would step on its own batch only and the copies would drift "
                "apart: call `loft_peft.distributed.average_gradients_across_processes(model)` after "
                "`accelerator.prepare` (LoftCallback does this for the Trainer)."
            )
    optimizer.__dict__[_CHECKED] = layout


# ================================================================================================ FSDP2 support
def average_gradients_across_processes(
    model_or_params: nn.Module | Iterable[nn.Parameter], *, group: Any | None = None
) -> list[Any]:
    """Average, across processes, the gradients of trainable parameters that no engine synchronises.

    For FSDP2 with the trainable parameters kept whole (``ignored_params``): each gets a hook that, whenever autograd
    has accumulated its gradient, all-reduces it and divides by the number of processes, as DDP does. With gradient
    accumulation the hook runs once per micro-batch; averaging is linear, so the accumulated gradient is the average
    of the processes' accumulated gradients all the same. Sharded (DTensor) parameters, which FSDP2 itself reduces,
    frozen parameters and parameters that already have the hook are skipped. Call it on every process, in the same
    order.

    Args:
        model_or_params: a model (its trainable parameters are taken) or the parameters themselves.
        group: the process group to average over (default: the whole world; for FSDP2 on a device mesh, the
            mesh's data-parallel group).

    Returns:
        The hook handles (``handle.remove()`` undoes one).

    Raises:
        ValueError: ``torch.distributed`` is not initialised.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "average_gradients_across_processes needs an initialised torch.distributed process group (launch with "
            "`accelerate launch` or `torchrun`, and create the Accelerator or call init_process_group first)."
        )
    world = dist.get_world_size(group)
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params

    def average(param: Tensor) -> None:
        if param.grad is not None:
            dist.all_reduce(param.grad, group=group)
            param.grad.div_(world)

    handles = []
    for param in params:
        if not param.requires_grad or _is_dtensor(param) or getattr(param, _AVERAGED, False):
            continue
        handles.append(param.register_post_accumulate_grad_hook(average))
        setattr(param, _AVERAGED, True)
    return handles


def _layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes of the model's repeated blocks, from ``transformers``' ``_no_split_modules`` names."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return tuple({type(m) for m in model.modules() if type(m).__name__ in names})


def shard_frozen_base(
    model: nn.Module,
    *,
    mesh: Any | None = None,
    layer_classes: Iterable[type] | None = None,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """FSDP2 for a LoFT model: shard the frozen base, keep the trainable parameters whole and average their gradients.

    Applies ``fully_shard`` to every repeated block (each its own all-gather unit) and then to the whole model, with
    all trainable parameters (LoFT factors, ``modules_to_save`` copies, trained biases) as ``ignored_params``, moves
    those to the device of the sharded weights, and calls :func:`average_gradients_across_processes` on them. The
    optimizer can be built before or after (the trainable parameters stay the same objects). Call on every process.

    Args:
        model: the LoFT model (``get_peft_model(model, LoftConfig(...))``), on the CPU or its device.
        mesh: the 1-D device mesh to shard over (default: ``fully_shard``'s, the whole world).
        layer_classes: the block classes to shard one by one (default: the model's ``_no_split_modules``).
        **fully_shard_kwargs: passed on to ``fully_shard`` (``reshard_after_forward``, ``mp_policy``, ...).

    Returns:
        The model, sharded in place.

    Raises:
        ValueError: the model has no trainable parameter, or no block class is found or given.
        TypeError: ``ignored_params`` is passed (this function chooses them).
    """
    from torch.distributed.fsdp import fully_shard

    if "ignored_params" in fully_shard_kwargs:
        raise TypeError("shard_frozen_base chooses ignored_params itself (every trainable parameter); do not pass it.")
    trainable = {p for p in model.parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("The model has no trainable parameter: wrap it with a LoftConfig before sharding it.")
    classes = tuple(layer_classes) if layer_classes is not None else _layer_classes(model)
    if not classes:
        raise ValueError(
            "No block class to shard: the model has no `_no_split_modules` (a transformers attribute); pass "
            "layer_classes=(YourBlock,)."
        )
    for module in list(model.modules()):
        if isinstance(module, classes):
            fully_shard(module, mesh=mesh, ignored_params=trainable, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=trainable, **fully_shard_kwargs)
    # fully_shard moves what it manages to the mesh's device and leaves ignored parameters where they were.
    sharded = next((p for p in model.parameters() if _is_dtensor(p)), None)
    if sharded is not None:
        device = sharded.to_local().device
        for param in trainable:
            if param.device != device:
                param.data = param.data.to(device)
    average_gradients_across_processes(trainable, group=mesh.get_group() if mesh is not None else None)
    return model


def prepare_distributed_training(model: nn.Module | None, optimizer: torch.optim.Optimizer | None = None) -> None:
    """What ``LoftCallback`` runs at the start of training: refuse what breaks LoFT, set up what FSDP2 needs.

    Refuses DeepSpeed and FSDP1 (:func:`check_distributed_setup`); under FSDP2, averages the gradients of the
    trainable parameters kept whole (:func:`average_gradients_across_processes`); then checks the optimizer's
    parameters (:func:`check_factor_layout`).
    """
    check_distributed_setup()
    if model is not None and is_fsdp2():
        average_gradients_across_processes(model)
    if optimizer is not None:
        check_factor_layout(optimizer)
