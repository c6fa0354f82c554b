"""LoFT adapters outside loft_peft: the exact LoRA export, the model card, and PEFT's own LoRA conversion."""

import json
import os
import re
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

from loft_peft import LoftConfig, convert_adapter_to_lora, export_lora
from loft_peft.export import main as export_main
from loft_peft.tuner import LoftLayer

from .conftest import tiny_gpt2, tiny_llama

IDS = torch.arange(12).reshape(2, 6)


def _trained(kind="llama", **config):
    """A LoFT model whose factors are both non-zero (as after training)."""
    base = tiny_llama(0) if kind == "llama" else tiny_gpt2(0)
    model = get_peft_model(base, LoftConfig(r=4, init_weights=False, **config))
    return model.eval()


def _pairs(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoftLayer)}


def test_lora_export_is_a_standard_lora_adapter_holding_the_factors(tmp_path):
    model = _trained()
    export_lora(model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["lora_alpha"] == 4  # scale alpha / r = 1
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
    assert not config["use_dora"] and not config["use_rslora"]
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    # The key layout LoRA readers (PEFT, vLLM) parse: base_model.model.<module>.lora_{A,B}.weight.
    assert all(re.fullmatch(r"base_model\.model\..+\.lora_[AB]\.weight", key) for key in tensors)
    layers = _pairs(model)
    assert len(tensors) == 2 * len(layers)
    for name, layer in layers.items():
        module = name.removeprefix("base_model.model.")
        assert torch.equal(tensors[f"base_model.model.{module}.lora_A.weight"], layer.loft_A["default"].detach())
        assert torch.equal(tensors[f"base_model.model.{module}.lora_B.weight"], layer.loft_B["default"].detach())
    assert "vllm serve" in (tmp_path / "lora" / "README.md").read_text()


PEFT_LOADS_LORA_BIASES = tuple(int(x) for x in peft.__version__.split(".")[:2]) >= (0, 21)


@pytest.mark.parametrize("kind, config", [("llama", {}), ("llama", {"modules_to_save": ["lm_head"]}),
                                          ("llama", {"trainable_token_indices": [3, 7]}), ("gpt2", {}),
                                          ("gpt2", {"bias": "loft_only"})])
def test_lora_export_loads_without_loft_peft_and_gives_the_loft_outputs(tmp_path, kind, config):
    if config.get("bias") and not PEFT_LOADS_LORA_BIASES:
        pytest.skip(f"peft {peft.__version__} drops a LoRA adapter's trained biases (0.21 loads them)")
    model = _trained(kind, **config)
    with torch.no_grad():  # what trained besides the factors moves too, so that the export must carry it
        for name, param in model.named_parameters():
            if param.requires_grad and "loft_" not in name:
                param.add_(torch.randn_like(param) * 0.5)
    torch.save({"ids": IDS, "logits": model(input_ids=IDS).logits.detach()}, tmp_path / "expected.pt")
    if config.get("bias"):
        with pytest.warns(UserWarning, match="not every LoRA reader loads them"):
            export_lora(model, tmp_path / "lora")
    else:
        export_lora(model, tmp_path / "lora")
    (tiny_llama(0) if kind == "llama" else tiny_gpt2(0)).save_pretrained(tmp_path / "base")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r}).eval()
        assert not any(name.startswith("loft_peft") for name in sys.modules), "loft_peft was imported"
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        logits = model(input_ids=expected["ids"]).logits
        torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
        print("OK", type(model.peft_config["default"]).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK LoraConfig" in result.stdout


def test_converting_a_saved_loft_adapter_gives_the_export_of_the_model(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path / "loft")
    convert_adapter_to_lora(tmp_path / "loft", tmp_path / "converted")
    export_lora(model, tmp_path / "exported")
    converted = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    exported = load_file(tmp_path / "exported" / "adapter_model.safetensors")
    assert converted.keys() == exported.keys()
    assert all(torch.equal(converted[k], exported[k]) for k in converted)
    read = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("converted", "exported")]
    assert {k: v for k, v in read[0].items() if k != "target_modules"} == {
        k: v for k, v in read[1].items() if k != "target_modules"
    }
    assert set(read[0]["target_modules"]) == set(read[1]["target_modules"])


def test_export_command_converts_and_refuses_a_non_empty_folder(tmp_path, capsys):
    _trained().save_pretrained(tmp_path / "loft")
    assert export_main([str(tmp_path / "loft"), str(tmp_path / "lora")]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my notes")
    assert export_main([str(tmp_path / "loft"), str(tmp_path / "mine")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("loft-export-lora: error:") and "not empty" in error and "\n" not in error
    assert (tmp_path / "mine" / "README.md").read_text() == "my notes"
    assert sorted(os.listdir(tmp_path / "mine")) == ["README.md"]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing config", "adapter_config.json not found"),
        ("empty weights", "adapter_model.safetensors is empty"),
        ("corrupt config", "adapter_config.json is not valid JSON"),
        ("truncated weights", "adapter_model.safetensors is corrupt or truncated"),
        ("lora adapter", "not a LoFT adapter config"),
    ],
)
def test_export_command_names_the_bad_file_and_writes_nothing(tmp_path, capsys, damage, message):
    _trained().save_pretrained(tmp_path / "loft")
    config, weights = tmp_path / "loft" / "adapter_config.json", tmp_path / "loft" / "adapter_model.safetensors"
    if damage == "missing config":
        config.unlink()
    elif damage == "empty weights":
        weights.write_bytes(b"")
    elif damage == "corrupt config":
        config.write_text('{"r": 4,')
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "LORA"}))
    assert export_main([str(tmp_path / "loft"), str(tmp_path / "lora")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("loft-export-lora: error:") and message in error and "\n" not in error
    assert not (tmp_path / "lora").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["loft"]  # no staging folder left behind


def test_peft_save_as_lora_converts_a_loft_model(tmp_path):
    save_as_lora = getattr(peft, "save_as_lora", None)
    if save_as_lora is None:
        pytest.skip(f"peft {peft.__version__} has no save_as_lora (it came with peft 0.19)")
    model = _trained()
    expected = model(input_ids=IDS).logits.detach()
    assert model.supports_lora_conversion()
    save_as_lora(tmp_path / "lora", model, rank=4)  # an SVD of B A at rank r: exact up to rounding
    loaded = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "lora").eval()
    torch.testing.assert_close(loaded(input_ids=IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_loft_model_card_says_how_to_load_and_export_it(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path / "loft")
    model.save_pretrained(tmp_path / "loft")  # saving again keeps one section
    card = (tmp_path / "loft" / "README.md").read_text()
    assert card.count("## LoFT adapter") == 1
    assert "pip install loft-peft" in card and "import loft_peft" in card and "loft-export-lora" in card
    assert "\n- loft\n" in card.split("\n---\n", 1)[0]
    lora = get_peft_model(tiny_llama(0), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    assert "LoFT" not in (tmp_path / "lora" / "README.md").read_text()


# ------------------------------------------------------------------------------------------- mixed adapter batches
def _two_adapters():
    model = get_peft_model(tiny_llama(0), LoftConfig(r=4, init_weights=False), adapter_name="a")
    model.add_adapter("b", LoftConfig(r=2, init_weights=False))
    return model.eval()


def test_mixed_adapter_batch_gives_each_row_its_adapters_output():
    model = _two_adapters()
    ids = torch.arange(24).reshape(4, 6) % 96
    names = ["a", "__base__", "b", "a"]
    mixed = model(input_ids=ids, adapter_names=names).logits
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = model(input_ids=ids[row : row + 1]).logits
        else:
            model.set_adapter(name)
            expected = model(input_ids=ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], expected, rtol=1e-5, atol=1e-6)
    model.set_adapter("a")
    assert not torch.allclose(mixed[0], mixed[2])  # the adapters differ, so the check above can fail


def test_mixed_adapter_batch_errors_are_peft_errors():
    model = _two_adapters()
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=ids, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(input_ids=ids, adapter_names=["a"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["a", "b"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        model(input_ids=ids, adapter_names=["a", "b"])
