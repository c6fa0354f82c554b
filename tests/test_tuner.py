"""The LOFT tuner type behaves in PEFT as LoRA does: registration, save/load, merge, unload, adapters, errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftConfig, get_peft_model
from peft.utils.peft_types import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

from loft_peft import LoftConfig, create_loft_optimizer
from loft_peft.tuner import LoftLayer

from .conftest import ToyModel, tiny_gpt2, tiny_llama


def _loft_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, LoftLayer)}


def test_import_registers_loft_peft_type():
    assert PeftType("LOFT") is PeftType.LOFT
    assert "LOFT" in [member.value for member in PeftType]
    assert LoftConfig(r=2).peft_type == PeftType.LOFT
    # Registering twice (e.g. a reload) is harmless.
    from loft_peft.tuner import register_loft

    register_loft()


def test_llama_default_targets_are_qkv_up_down():
    model = get_peft_model(tiny_llama(), LoftConfig(r=4))
    suffixes = {name.rsplit(".", 1)[-1] for name in _loft_layers(model)}
    assert suffixes == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert len(_loft_layers(model)) == 2 * 5


def test_gpt2_default_targets_wrap_conv1d_without_flags():
    model = get_peft_model(tiny_gpt2(), LoftConfig(r=4))
    layers = _loft_layers(model)
    assert {name.split(".h.")[1].split(".", 1)[1] for name in layers} == {"attn.c_attn", "mlp.c_fc", "mlp.c_proj"}
    layer = layers["base_model.model.transformer.h.0.attn.c_attn"]
    assert isinstance(layer.get_base_layer(), Conv1D)
    assert layer.loft_A["default"].shape == (4, 32) and layer.loft_B["default"].shape == (96, 4)
    assert layer.get_delta_weight("default").shape == layer.get_base_layer().weight.shape == (32, 96)


def test_factor_shapes_and_lora_style_initialisation(toy_model):
    model = get_peft_model(toy_model, LoftConfig(r=3, target_modules=["proj"]))
    layer = model.base_model.model.proj
    assert layer.loft_A["default"].shape == (3, 9)
    assert layer.loft_B["default"].shape == (12, 3)
    assert torch.count_nonzero(layer.loft_B["default"]) == 0
    assert layer.loft_A["default"].abs().sum() > 0
    x = torch.randn(4, 9)
    with model.disable_adapter():
        base_out = model(x)
    torch.testing.assert_close(model(x), base_out)


def test_delta_weight_is_b_at_a_at_scale_one(toy_model):
    model = get_peft_model(toy_model, LoftConfig(r=3, target_modules=["proj"], init_weights=False))
    layer = model.base_model.model.proj
    x = torch.randn(5, 9)
    expected = layer.get_base_layer()(x) + x @ (layer.loft_B["default"] @ layer.loft_A["default"]).T
    torch.testing.assert_close(layer(x), expected)


def test_linear_and_conv1d_follow_the_same_trajectory():
    torch.manual_seed(0)
    linear_base = nn.Sequential()
    linear_base.add_module("proj", nn.Linear(6, 10, bias=True))
    conv_base = nn.Sequential()
    conv_base.add_module("proj", Conv1D(10, 6))
    with torch.no_grad():
        conv_base.proj.weight.copy_(linear_base.proj.weight.T)
        conv_base.proj.bias.copy_(linear_base.proj.bias)
    config = dict(r=2, target_modules=["proj"], init_weights=False)
    torch.manual_seed(1)
    linear_model = get_peft_model(linear_base.double(), LoftConfig(**config))
    torch.manual_seed(1)
    conv_model = get_peft_model(conv_base.double(), LoftConfig(**config))
    for name in ("loft_A", "loft_B"):
        torch.testing.assert_close(
            getattr(linear_model.base_model.model.proj, name)["default"],
            getattr(conv_model.base_model.model.proj, name)["default"],
        )
    optimizers = [create_loft_optimizer(m, lr=1e-2) for m in (linear_model, conv_model)]
    x = torch.randn(7, 6, dtype=torch.float64)
    for _ in range(6):
        for model, optimizer in zip((linear_model, conv_model), optimizers):
            (model(x).sin().sum()).backward()
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad()
    for name in ("loft_A", "loft_B"):
        torch.testing.assert_close(
            getattr(linear_model.base_model.model.proj, name)["default"],
            getattr(conv_model.base_model.model.proj, name)["default"],
            rtol=1e-10,
            atol=1e-12,
        )
    torch.testing.assert_close(linear_model(x), conv_model(x), rtol=1e-10, atol=1e-12)


def _trained_llama(seed=0):
    model = get_peft_model(tiny_llama(seed), LoftConfig(r=4, init_weights=False))
    return model


def test_save_writes_loft_peft_type_and_only_adapter_weights(tmp_path):
    model = _trained_llama()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOFT"
    assert config["r"] == 4 and "lora_alpha" not in config
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all("loft_A" in k or "loft_B" in k for k in keys)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), LoftConfig)


def test_load_in_fresh_process_reproduces_outputs(tmp_path):
    model = _trained_llama()
    model.eval()
    ids = torch.arange(12).reshape(2, 6)
    torch.save({"ids": ids, "logits": model(input_ids=ids).logits.detach()}, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "adapter")
    base_only = tiny_llama(0)
    base_only.save_pretrained(tmp_path / "base")
    # Point the adapter at the base folder so AutoPeftModel can find it.
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    config_path.write_text(json.dumps(config))
    script = textwrap.dedent(
        f"""
        import torch, loft_peft
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        torch.testing.assert_close(model(input_ids=expected["ids"]).logits, expected["logits"])
        auto = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / "adapter")!r}).eval()
        torch.testing.assert_close(auto(input_ids=expected["ids"]).logits, expected["logits"])
        print("OK", type(model.peft_config["default"]).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK LoftConfig" in result.stdout


def test_merge_and_unload_keeps_outputs():
    model = _trained_llama().eval()
    ids = torch.arange(12).reshape(2, 6)
    expected = model(input_ids=ids).logits.detach()
    merged = model.merge_and_unload()
    assert not _loft_layers(merged)
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_unload_returns_the_untouched_base():
    reference = tiny_llama(0).eval()
    ids = torch.arange(12).reshape(2, 6)
    expected = reference(input_ids=ids).logits.detach()
    model = _trained_llama().eval()
    assert not torch.allclose(model(input_ids=ids).logits, expected)
    unloaded = model.unload()
    assert not _loft_layers(unloaded)
    torch.testing.assert_close(unloaded(input_ids=ids).logits, expected)


def test_disable_adapter_gives_base_outputs():
    reference = tiny_llama(0).eval()
    ids = torch.arange(12).reshape(2, 6)
    model = _trained_llama().eval()
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert not torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_named_adapters_switch_and_train_separately():
    model = get_peft_model(tiny_llama(0), LoftConfig(r=4, init_weights=False), adapter_name="first")
    model.add_adapter("second", LoftConfig(r=2, init_weights=False, target_modules=["q_proj"]))
    ids = torch.arange(12).reshape(2, 6)
    out_first = model(input_ids=ids).logits.detach()
    model.set_adapter("second")
    out_second = model(input_ids=ids).logits.detach()
    assert not torch.allclose(out_first, out_second)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    model.set_adapter("first")
    torch.testing.assert_close(model(input_ids=ids).logits, out_first)


def test_print_trainable_parameters_counts_factors(capsys):
    model = get_peft_model(tiny_llama(0), LoftConfig(r=4))
    model.print_trainable_parameters()
    expected = sum(
        layer.loft_A["default"].numel() + layer.loft_B["default"].numel() for layer in _loft_layers(model).values()
    )
    assert f"trainable params: {expected:,}" in capsys.readouterr().out


def test_modules_to_save_and_bias_train(toy_model):
    model = get_peft_model(toy_model, LoftConfig(r=2, target_modules=["proj"], modules_to_save=["head"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("head.modules_to_save" in n for n in trainable)
    assert any(n.endswith("proj.base_layer.bias") for n in trainable)


def test_layers_to_transform_limits_targets():
    model = get_peft_model(tiny_llama(0), LoftConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]))
    assert list(_loft_layers(model)) == ["base_model.model.model.layers.1.self_attn.q_proj"]


def test_exclude_modules_skips_targets():
    model = get_peft_model(tiny_llama(0), LoftConfig(r=2, target_modules=["q_proj", "k_proj"], exclude_modules=["k_proj"]))
    assert all(name.endswith("q_proj") for name in _loft_layers(model))


@pytest.mark.parametrize("rank", [0, -1, 2.0, "4", True])
def test_bad_rank_raises_value_error(rank):
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        LoftConfig(r=rank)


def test_rank_above_a_targets_width_is_refused_naming_the_layer_and_full_rank_is_allowed(toy_model):
    # proj is 9 -> 12: r = 12 = max(in, out) is full rank (AdamW exactly); 13 cannot be.
    with pytest.raises(ValueError, match=r"r=13 is above the width of target module 'proj' \(max\(in, out\) = 12\)"):
        get_peft_model(toy_model, LoftConfig(r=13, target_modules=["proj"]))
    model = get_peft_model(ToyModel(), LoftConfig(r=12, target_modules=["proj"]))
    assert model.base_model.model.proj.loft_A["default"].shape == (12, 9)


def test_unknown_config_key_raises():
    with pytest.raises(TypeError, match="lora_alpha"):
        LoftConfig(r=2, lora_alpha=16)


def test_embedding_target_raises_naming_module_and_type():
    with pytest.raises(TypeError, match=r"'model.embed_tokens' is a torch.nn.modules.sparse.Embedding"):
        get_peft_model(tiny_llama(0), LoftConfig(r=2, target_modules=["embed_tokens"]))


def test_conv2d_target_raises_naming_module_and_type():
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match=r"'conv' is a torch.nn.modules.conv.Conv2d"):
        get_peft_model(model, LoftConfig(r=2, target_modules=["conv"]))


def test_missing_target_module_raises_naming_it():
    with pytest.raises(ValueError, match="does_not_exist"):
        get_peft_model(tiny_llama(0), LoftConfig(r=2, target_modules=["does_not_exist"]))


def test_unknown_model_type_without_targets_asks_for_target_modules(toy_model):
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(toy_model, LoftConfig(r=2))


def test_optimizer_without_loft_layers_raises(toy_model):
    with pytest.raises(ValueError, match="no LoFT layer"):
        create_loft_optimizer(toy_model, lr=1e-3)
