"""Every internal of PyTorch, transformers, accelerate and PEFT that loft_peft relies on, in one place.

These are not public APIs: a release may change them without notice. Each entry names the internal, what loft_peft
assumes of it and where it is used; ``tests/test_upstream.py`` has one test per entry, named
``test_upstream_<name>``, so that a release that breaks an assumption fails under that name (CI runs the suite
against the newest releases too: ``make test-latest``).
"""

INTERNALS: dict[str, str] = {
    "trainer_clips_before_pre_optimizer_step": (
        "transformers.Trainer's training loop clips through `accelerator.clip_grad_norm_(params, max_grad_norm)` "
        "only when `args.max_grad_norm > 0`, after the last micro-batch's backward and before the callbacks' "
        "`on_pre_optimizer_step`; with 0 it still calls it with `inf` to measure the norm. LoftCallback sets "
        "`args.max_grad_norm` to 0 inside each step and clips in `on_pre_optimizer_step` (trainer.py)."
    ),
    "accelerate_clip_unscales_fp16": (
        "`Accelerator.clip_grad_norm_` unscales the GradScaler's gradients (`unscale_gradients`) also when "
        "`max_norm` is inf and clips nothing, so LoftCallback's clip sees unscaled fp16 gradients (trainer.py)."
    ),
    "accelerated_optimizer_step_was_skipped": (
        "accelerate's `AcceleratedOptimizer.step_was_skipped` is True after a GradScaler skipped the step (fp16 "
        "overflow); LoftCallback then counts no factor as moved (trainer.py)."
    ),
    "trainer_default_callbacks": (
        "`transformers.trainer.DEFAULT_CALLBACKS` is the list of callback classes every Trainer instantiates; "
        "`import loft_peft` appends LoftGuardCallback to it (trainer.install_trainer_guard)."
    ),
    "peft_type_enum_members": (
        "PEFT's `PeftType` is a closed str Enum; loft_peft adds `LOFT` through `_member_names_`, `_member_map_` and "
        "`_value2member_map_` (tuner/model.py, _extend_peft_type)."
    ),
    "peft_register_peft_method": (
        "`peft.utils.register_peft_method(name=, config_cls=, model_cls=, prefix=)` registers a tuner type "
        "(tuner/model.py, register_loft)."
    ),
    "peft_model_card_hook": (
        "`PeftModel.save_pretrained` writes README.md through `PeftModel.create_or_update_model_card(output_dir)`, "
        "which loft_peft wraps to add the LoFT section (tuner/model_card.py)."
    ),
    "peft_forward_hooks": (
        "`PeftModel.forward(..., adapter_names=...)` enters the tuner's `_enable_peft_forward_hooks(**kwargs)`, "
        "where LoftModel hands each layer the rows' adapters (tuner/model.py, mixed adapter batches)."
    ),
    "peft_trainable_tokens_from_config": (
        "PEFT creates trainable token rows for any config with a `trainable_token_indices` attribute, not only "
        "LoraConfig (tuner/config.py; TRL sets the field when a chat template adds tokens)."
    ),
    "peft_lora_conversion": (
        "PEFT's `convert_to_lora` / `save_as_lora` convert any layer whose `supports_lora_conversion(adapter_name)` "
        "is True from its `get_delta_weight(adapter_name)` (tuner/layer.py; PEFT >= 0.19)."
    ),
    "torch_global_step_pre_hook": (
        "`torch.optim.optimizer.register_optimizer_step_pre_hook` runs its hook before every optimizer's `step()`; "
        "loft_peft warns there when another optimizer trains LoFT factors (optim/guard.py)."
    ),
    "torch_amp_non_finite_check": (
        "`torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)` (GradScaler's check) sets "
        "`found_inf` when any gradient holds a NaN or inf and scales the gradients by `inv_scale`; LoftOptimizerBase "
        "uses it with a scale of 1 to skip a step on non-finite gradients (optim/base.py)."
    ),
    "accelerate_state_and_fsdp_plugin": (
        "accelerate's `AcceleratorState._shared_state` is empty until an Accelerator exists; the state has "
        "`distributed_type`, and under FSDP a `fsdp_plugin` with `fsdp_version` and `cpu_ram_efficient_loading` "
        "(distributed.py)."
    ),
}
