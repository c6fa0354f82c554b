"""Parameter groups for the LoFT optimizers: the (loft_B, loft_A) pairs found through the LoFT layers, and plain
groups split into factor and plain parts by the marks the layers put on their factors."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..tuner.layer import LoftLayer


def loft_factor_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """``(loft_B, loft_A)`` of every LoFT layer's active, trainable adapters, in module order.

    Pairs come from the layers themselves (``LoftLayer.loft_B[name]``, ``LoftLayer.loft_A[name]``), never from
    parameter names.
    """
    pairs = []
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, LoftLayer):
            continue
        for name in module.active_adapters:
            if name not in module.loft_A:
                continue
            module.mark_factors(name)
            b_param, a_param = module.loft_B[name], module.loft_A[name]
            if not (b_param.requires_grad or a_param.requires_grad) or id(b_param) in seen:
                continue
            seen.add(id(b_param))
            pairs.append((b_param, a_param))
    return pairs


def loft_param_groups(model: nn.Module, **factor_group_options: Any) -> list[dict[str, Any]]:
    """Parameter groups for a LoFT optimizer: one factor group of (B, A) pairs, one plain group for the rest.

    Args:
        model: a model holding LoFT layers (a ``PeftModel`` or the model ``get_peft_model`` wrapped).
        **factor_group_options: options stored on the factor group only (e.g. a different ``lr``).

    Raises:
        ValueError: the model has no LoFT layer with an active, trainable adapter.
    """
    pairs = loft_factor_pairs(model)
    if not pairs:
        raise ValueError(
            "The model has no LoFT layer with an active, trainable adapter: wrap it with "
            "`get_peft_model(model, LoftConfig(...))` (after `import loft_peft`) before creating the optimizer."
        )
    in_pairs = {id(p) for pair in pairs for p in pair}
    for pair in pairs:
        for p in pair:
            p.requires_grad_(True)
    plain = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.loft_name = name  # for messages that name a parameter (e.g. one whose gradients are not finite)
    groups: list[dict[str, Any]] = [{"params": [p for pair in pairs for p in pair], "loft": True, **factor_group_options}]
    if plain:
        groups.append({"params": plain, "loft": False})
    return groups


def pair_marked_factors(group: dict[str, Any]) -> list[dict[str, Any]]:
    """Split a parameter group that does not say ``"loft"`` into a factor group and a plain group.

    The LoFT layers mark their factors (``param.loft_factor``, ``param.loft_pair``; see :mod:`loft_peft.tuner.layer`),
    so a plain list such as ``[p for p in model.parameters() if p.requires_grad]``, or the Trainer's name-based groups,
    still gives LoFT its (B, A) pairs, in the order their B factors appear. The group's other options go to both
    parts. A group that sets ``"loft"`` is taken as it is.

    Raises:
        ValueError: a factor is in the group without the other factor of its pair.
    """
    if "loft" in group:
        return [group]
    params = group["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    pairs: dict[int, dict[str, Tensor]] = {}
    plain = []
    for param in params:
        role, token = getattr(param, "loft_factor", None), getattr(param, "loft_pair", None)
        if role in ("A", "B") and token is not None:
            pairs.setdefault(id(token), {})[role] = param
        else:
            plain.append(param)
    for pair in pairs.values():
        if len(pair) != 2:
            (role, param), = pair.items()
            raise ValueError(
                f"A parameter group holds loft_{role} of a LoFT layer (shape {tuple(param.shape)}) without its "
                f"loft_{'A' if role == 'B' else 'B'}: LoFT steps the two factors of a layer together, so put both in "
                "the same group (or build the optimizer with `create_loft_optimizer(model, ...)`)."
            )
    options = {key: value for key, value in group.items() if key != "params"}
    parts = []
    if pairs:
        parts.append({**options, "params": [p for pair in pairs.values() for p in (pair["B"], pair["A"])], "loft": True})
    if plain or not pairs:
        parts.append({**options, "params": plain, "loft": False})
    return parts
