"""One test per upstream internal that loft_peft relies on (``loft_peft.upstream.INTERNALS``), named after it."""

import inspect
import math
import sys

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from loft_peft import LoftConfig
from loft_peft.upstream import INTERNALS

from .conftest import tiny_llama


def test_every_internal_has_its_test():
    tests = {name.removeprefix("test_upstream_") for name in dir(sys.modules[__name__]) if name.startswith("test_up")}
    assert set(INTERNALS) == tests


def _tiny_trainer(tmp_path, **args):
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0)).tolist()
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                   use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    options.update(args)
    model = get_peft_model(tiny_llama(0), LoftConfig(r=2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    return Trainer(model=model, args=TrainingArguments(**options),
                   train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}), optimizers=(optimizer, None))


@pytest.mark.filterwarnings("ignore:SGD is training")
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_upstream_trainer_clips_before_pre_optimizer_step(tmp_path, max_grad_norm):
    events = []

    class Spy(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
            assert optimizer is not None and model is not None
            events.append("on_pre_optimizer_step")

    trainer = _tiny_trainer(tmp_path, max_grad_norm=max_grad_norm)
    trainer.add_callback(Spy())
    clip = trainer.accelerator.clip_grad_norm_

    def spy_clip(parameters, max_norm, *args, **kwargs):
        events.append(("clip", max_norm))
        return clip(parameters, max_norm, *args, **kwargs)

    trainer.accelerator.clip_grad_norm_ = spy_clip
    trainer.train()
    assert events == [("clip", max_grad_norm if max_grad_norm > 0 else math.inf), "on_pre_optimizer_step"]


def test_upstream_accelerate_clip_unscales_fp16():
    from accelerate import Accelerator

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a previous test's Accelerator fixed the precision
    # On the CPU accelerate runs fp16 without autocast or scaler; giving it torch's CPU GradScaler runs the GPU's path.
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = accelerator.prepare(torch.optim.SGD([parameter], lr=0.1))
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    optimizer.scaler = accelerator.scaler
    accelerator.native_amp = True
    accelerator.backward((parameter * 2.0).sum())  # scaled: the gradient is 2 * 8 = 16
    accelerator.clip_grad_norm_([parameter], math.inf)
    torch.testing.assert_close(parameter.grad, torch.full((3,), 2.0))


def test_upstream_accelerated_optimizer_step_was_skipped():
    from accelerate.optimizer import AcceleratedOptimizer

    parameter = torch.nn.Parameter(torch.ones(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    optimizer = AcceleratedOptimizer(torch.optim.SGD([parameter], lr=0.1), scaler=scaler)
    scaler.scale(parameter.sum()).backward()
    parameter.grad.fill_(math.inf)  # an fp16 overflow
    optimizer.step()  # scaler.step finds the inf and skips SGD's step; scaler.update halves the scale
    assert optimizer.step_was_skipped is True and scaler.get_scale() == 4.0
    assert torch.equal(parameter.detach(), torch.ones(3))


def test_upstream_trainer_default_callbacks(tmp_path):
    import transformers.trainer

    from loft_peft.trainer import LoftGuardCallback

    assert isinstance(transformers.trainer.DEFAULT_CALLBACKS, list)
    assert LoftGuardCallback in transformers.trainer.DEFAULT_CALLBACKS
    trainer = _tiny_trainer(tmp_path)
    assert any(isinstance(cb, LoftGuardCallback) for cb in trainer.callback_handler.callbacks)


def test_upstream_peft_type_enum_members():
    from peft.utils.peft_types import PeftType

    for name in ("_member_names_", "_member_map_", "_value2member_map_"):
        assert hasattr(PeftType, name), name
    assert PeftType("LOFT") is PeftType.LOFT is PeftType["LOFT"]
    assert PeftType.LOFT == "LOFT" and "LOFT" in PeftType._member_names_


def test_upstream_peft_register_peft_method():
    from peft.utils import register_peft_method

    parameters = inspect.signature(register_peft_method).parameters
    assert {"name", "config_cls", "model_cls", "prefix"} <= set(parameters)


def test_upstream_peft_model_card_hook(tmp_path, monkeypatch):
    calls = []
    wrapped = PeftModel.create_or_update_model_card
    monkeypatch.setattr(PeftModel, "create_or_update_model_card",
                        lambda self, output_dir: (calls.append(output_dir), wrapped(self, output_dir)))
    get_peft_model(tiny_llama(0), LoftConfig(r=2)).save_pretrained(tmp_path)
    assert [str(c) for c in calls] == [str(tmp_path)]
    assert "## LoFT adapter" in (tmp_path / "README.md").read_text()


def test_upstream_peft_forward_hooks(monkeypatch):
    from loft_peft.tuner import LoftModel

    seen = []
    original = LoftModel._enable_peft_forward_hooks

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("adapter_names"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoftModel, "_enable_peft_forward_hooks", spy)
    model = get_peft_model(tiny_llama(0), LoftConfig(r=2)).eval()
    model(input_ids=torch.zeros(2, 3, dtype=torch.long), adapter_names=["default", "__base__"])
    assert seen == [["default", "__base__"]]


def test_upstream_peft_trainable_tokens_from_config():
    model = get_peft_model(tiny_llama(0), LoftConfig(r=2, trainable_token_indices=[3, 7]))
    deltas = [p for n, p in model.named_parameters() if n.endswith("trainable_tokens_delta.default")]
    assert len(deltas) == 1 and deltas[0].shape == (2, 32) and deltas[0].requires_grad


def test_upstream_peft_lora_conversion():
    import peft

    if not hasattr(peft, "convert_to_lora"):
        pytest.skip(f"peft {peft.__version__} has no LoRA conversion (it came with peft 0.19)")
    from peft import convert_to_lora

    model = get_peft_model(tiny_llama(0), LoftConfig(r=2, init_weights=False))
    config, state_dict = convert_to_lora(model, rank=2)
    assert config.r == 2 and config.lora_alpha == 2
    assert any(key.endswith("q_proj.lora_A.weight") for key in state_dict)


def test_upstream_torch_global_step_pre_hook():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: seen.append(type(optimizer).__name__))
    try:
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).step()
    finally:
        handle.remove()
    assert seen == ["SGD"]


def test_upstream_accelerate_state_and_fsdp_plugin():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import FullyShardedDataParallelPlugin

    assert hasattr(AcceleratorState, "_shared_state")
    Accelerator(cpu=True)
    state = AcceleratorState()
    assert AcceleratorState._shared_state
    assert str(getattr(state.distributed_type, "value", state.distributed_type)) == "NO"
    # Read with getattr(state, "fsdp_plugin" / "deepspeed_plugin", None): present under FSDP / DeepSpeed only.
    assert {"fsdp_version", "cpu_ram_efficient_loading"} <= set(
        inspect.signature(FullyShardedDataParallelPlugin).parameters
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_upstream_torch_amp_non_finite_check(dtype):
    grads = [torch.ones(3, 2, dtype=dtype), torch.full((4,), 2.0, dtype=dtype)]
    found, one = torch.zeros(1), torch.ones(1)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    assert float(found) == 0.0 and torch.equal(grads[1], torch.full((4,), 2.0, dtype=dtype))  # values unchanged
    grads[0][1, 1] = float("nan")
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, one)
    assert float(found) == 1.0
