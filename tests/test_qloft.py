"""QLoFT: LoFT on bitsandbytes 4-bit models, on the CPU, with a tiny LLaMA saved to disk and reloaded in 4 bits.

On CPUs with AVX512-BF16, bitsandbytes switches a ``Linear4bit`` to its inference kernel on an ``eval()`` forward
without gradients (see ``loft_peft.tuner.bnb``), and that kernel rejects the tiny model's shapes; forwards here
therefore run in ``train()`` mode, which is deterministic for these models (no dropout in LLaMA's config or the
adapters). The one test about that switch uses a model widened to shapes the kernel takes.
"""

import sys

import pytest
import torch
from peft import PeftModel, get_peft_model

from loft_peft import LoftConfig, create_loft_optimizer
from loft_peft.tuner import LoftLayer

from .conftest import tiny_gpt2, tiny_llama

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from loft_peft.quantization import check_quantization, load_qloft_model  # noqa: E402
from loft_peft.tuner.bnb import (  # noqa: E402
    HALF_STEP_4BIT,
    Linear4bit,
    check_bnb_layer_supported,
    dequantize_4bit_weight,
    requantization_error_bound,
)

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}
QUANT_OPTIONS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama().save_pretrained(path)
    return path


def _bnb_config(quant_type="nf4", double_quant=True, compute_dtype=torch.float32):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _load_4bit(path, **options):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=_bnb_config(**options), device_map="cpu")


def _loft_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, LoftLayer)}


def _batch(seed=0, batch=4, length=16):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 96, (batch, length), generator=generator)


@torch.no_grad()
def _logits(model, ids):
    model.train()  # see the module docstring
    return model(input_ids=ids).logits.float()


def _train(model, steps=12, lr=2e-2, max_norm=1.0):
    optimizer = create_loft_optimizer(model, lr=lr)
    ids = _batch(seed=1)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.clip_grad_norm_(max_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, optimizer


def _randomise_factors(model, seed=0, scale=1.0):
    """Non-zero factors (as after training), so merges and reloads have something to get wrong."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _loft_layers(model).values():
            for factors in (layer.loft_A, layer.loft_B):
                for param in factors.values():
                    param.copy_(scale * torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)


# ------------------------------------------------------------------------------------------------------- wrapping
@pytest.mark.parametrize("quant_type,double_quant", QUANT_OPTIONS)
def test_every_target_linear4bit_is_wrapped_and_only_the_factors_train(llama_dir, quant_type, double_quant):
    base = _load_4bit(llama_dir, quant_type=quant_type, double_quant=double_quant)
    quantized = {name for name, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    model = get_peft_model(base, LoftConfig(r=4))

    layers = _loft_layers(model)
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    for name, layer in layers.items():
        assert name.rsplit(".", 1)[-1] in LLAMA_TARGETS
        assert isinstance(layer, Linear4bit)
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
        assert layer.get_base_layer().weight.quant_type == quant_type
        assert layer.get_base_layer().weight.compress_statistics == double_quant
    # Every targeted Linear4bit was wrapped; the others (o_proj, gate_proj) are still bare Linear4bit.
    targeted = {name for name in quantized if name.rsplit(".", 1)[-1] in LLAMA_TARGETS}
    assert {name.removeprefix("base_model.model.") for name in layers} == targeted
    untargeted = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("o_proj", "gate_proj")]
    assert untargeted and all(type(m) is bnb.nn.Linear4bit for m in untargeted)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".loft_A." in name or ".loft_B." in name for name in trainable)
    for layer in layers.values():
        assert layer.loft_A["default"].dtype == torch.float32
        assert not layer.get_base_layer().weight.requires_grad


def test_gpt2_conv1d_asked_for_4bit_wraps_every_target(tmp_path):
    """transformers turns GPT-2's Conv1D into (transposed) Linear4bit; LoFT then wraps all of them, skipping none."""
    torch.manual_seed(0)
    tiny_gpt2().save_pretrained(tmp_path)
    base = _load_4bit(tmp_path)
    model = get_peft_model(base, LoftConfig(r=4, init_weights=False))

    layers = _loft_layers(model)
    suffixes = sorted(name.split(".h.")[1].split(".", 1)[1] for name in layers)
    assert suffixes == sorted(["attn.c_attn", "mlp.c_fc", "mlp.c_proj"] * 2)
    for layer in layers.values():
        assert isinstance(layer, Linear4bit) and isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
    # The adapter is in nn.Linear layout against the (out, in) 4-bit weight: y = base(x) + x A^T B^T.
    layer = layers["base_model.model.transformer.h.0.attn.c_attn"]
    assert layer.loft_A["default"].shape == (4, 32) and layer.loft_B["default"].shape == (96, 4)
    x = torch.randn(3, 32)
    model.train()  # see the module docstring
    with torch.no_grad():
        expected = layer.get_base_layer()(x) + x @ layer.loft_A["default"].T @ layer.loft_B["default"].T
        assert torch.allclose(layer(x), expected, atol=1e-6)


def test_8bit_layer_is_refused_not_wrapped_as_a_float_layer(llama_dir):
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    layer = base.model.layers[0].self_attn.q_proj
    assert isinstance(layer, torch.nn.Linear)  # which is why the check is needed
    with pytest.raises(TypeError, match="4-bit quantization only"):
        check_bnb_layer_supported(layer, "model.layers.0.self_attn.q_proj")
    check_bnb_layer_supported(torch.nn.Linear(2, 2), "a float layer")  # no error


# ---------------------------------------------------------------------------------------------- load_qloft_model
def test_load_qloft_model_equals_the_plain_route(llama_dir):
    torch.manual_seed(0)
    model = load_qloft_model(llama_dir, LoftConfig(r=4), compute_dtype=torch.float32, device_map="cpu")
    assert isinstance(model, PeftModel)
    assert model.base_model.model.is_gradient_checkpointing
    layers = _loft_layers(model)
    assert len(layers) == 2 * len(LLAMA_TARGETS)
    weight = next(iter(layers.values())).get_base_layer().weight
    assert (weight.quant_type, weight.compress_statistics) == ("nf4", True)

    torch.manual_seed(0)
    plain = get_peft_model(_load_4bit(llama_dir), LoftConfig(r=4))
    ids = _batch()
    assert torch.equal(_logits(model, ids), _logits(plain, ids))


def test_load_qloft_model_factor_dtype_bf16_trains_with_fp32_optimizer_state(llama_dir):
    model = load_qloft_model(
        llama_dir, LoftConfig(r=4), factor_dtype="bf16", gradient_checkpointing=False, device_map="cpu"
    )
    layer = next(iter(_loft_layers(model).values()))
    assert layer.loft_A["default"].dtype == layer.loft_B["default"].dtype == torch.bfloat16
    losses, optimizer = _train(model, steps=8)
    assert losses[-1] < losses[0]
    state = optimizer.state[layer.loft_B["default"]]
    assert all(v.dtype == torch.float32 for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point())


# ------------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_training_lowers_the_loss_and_the_4bit_base_computes_the_same_outputs(llama_dir, quant_type, double_quant):
    model = get_peft_model(_load_4bit(llama_dir, quant_type=quant_type, double_quant=double_quant), LoftConfig(r=4))
    bases = {name: layer.get_base_layer() for name, layer in _loft_layers(model).items()}
    bases.update({n: m for n, m in model.named_modules() if type(m) is bnb.nn.Linear4bit and n not in bases})
    probes = {name: torch.randn(5, base.in_features, generator=torch.Generator().manual_seed(7)) for name, base in
              bases.items()}

    def base_outputs():
        model.train()  # see the module docstring
        with torch.no_grad():
            return {name: bases[name](probes[name]) for name in bases}

    before = base_outputs()
    losses, _ = _train(model, steps=12)
    after = base_outputs()

    assert losses[-1] < 0.95 * losses[0]
    # Compare outputs, not bytes: bitsandbytes may repack storage on the CPU.
    for name in bases:
        assert torch.equal(before[name], after[name]), name


def test_loft_trainer_trains_a_4bit_model_with_effective_clipping(llama_dir, tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from loft_peft.trainer import LoftTrainer

    model = load_qloft_model(llama_dir, LoftConfig(r=4), compute_dtype=torch.float32, device_map="cpu")
    ids = _batch(seed=1, batch=8).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        max_grad_norm=0.5,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = LoftTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert [entry["loft_moved_B"] for entry in logs] == [1.0, 0.0] * 4  # the factors alternate


# -------------------------------------------------------------------------------------------- saving and loading
def test_adapter_save_and_reload_onto_a_fresh_4bit_base_reproduces_outputs(llama_dir, tmp_path):
    model = get_peft_model(_load_4bit(llama_dir), LoftConfig(r=4))
    _train(model, steps=4)
    ids = _batch()
    expected = _logits(model, ids)
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(_load_4bit(llama_dir), tmp_path / "adapter")
    assert len(_loft_layers(reloaded)) == 2 * len(LLAMA_TARGETS)
    assert torch.equal(_logits(reloaded, ids), expected)
    # and the adapter is doing something: without it the outputs differ
    with reloaded.disable_adapter():
        assert not torch.allclose(_logits(reloaded, ids), expected, atol=1e-4)


def test_unload_gives_back_the_untouched_4bit_base(llama_dir):
    ids = _batch()
    expected = _logits(_load_4bit(llama_dir), ids)
    model = get_peft_model(_load_4bit(llama_dir), LoftConfig(r=4))
    _train(model, steps=4)
    base = model.unload()
    assert not any(isinstance(m, LoftLayer) for m in base.modules())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in base.modules()) == 2 * 7
    assert torch.equal(_logits(base, ids), expected)


# ------------------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize(
    "quant_type,double_quant,dtype",
    [("nf4", True, torch.float32), ("nf4", False, torch.bfloat16), ("fp4", True, torch.bfloat16),
     ("fp4", False, torch.float32)],
)
def test_merge_error_is_within_the_documented_bound(llama_dir, quant_type, double_quant, dtype):
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=_bnb_config(quant_type, double_quant), device_map="cpu", dtype=dtype
    )
    model = get_peft_model(base, LoftConfig(r=4))
    _randomise_factors(model, scale=0.05)
    ids = _batch()
    adapted_logits = _logits(model, ids)
    adapted = {}
    for name, layer in _loft_layers(model).items():
        adapted[name] = dequantize_4bit_weight(layer.get_base_layer()).float() + layer.get_delta_weight("default")

    with pytest.warns(UserWarning, match="requantizes"):
        merged = model.merge_and_unload()

    for name, reference in adapted.items():
        layer = merged.get_submodule(name.removeprefix("base_model.model."))
        assert type(layer) is bnb.nn.Linear4bit
        state = layer.weight.quant_state
        assert (state.quant_type, state.nested, state.dtype) == (quant_type, double_quant, dtype)
        error = (dequantize_4bit_weight(layer).float() - reference).abs()
        bound = requantization_error_bound(
            reference, quant_type=quant_type, blocksize=state.blocksize, double_quant=double_quant, dtype=dtype
        )
        assert torch.all(error <= bound), name
    # The merged model still computes (about) what the adapted one did.
    merged_logits = _logits(merged, ids)
    relative = (merged_logits - adapted_logits).norm() / adapted_logits.norm()
    assert relative < 0.2


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merge_bound_is_reached_at_the_widest_code_gap(quant_type):
    """The bound's constant is half the widest gap between neighbouring codes, and a weight there attains it."""
    code = bnb.functional.get_4bit_type(quant_type, device="cpu").sort().values
    gaps = code[1:] - code[:-1]
    widest = int(gaps.argmax())
    assert gaps[widest].item() / 2 <= HALF_STEP_4BIT[quant_type] < gaps[widest].item() / 2 + 1e-5
    # Blocks of scale 1 (their first element is 1) whose other elements sit just off the middle of the widest gap.
    midpoint = (code[widest] + code[widest + 1]).item() / 2
    weight = torch.full((4, 64), midpoint) + torch.linspace(-1e-3, 1e-3, 64)
    weight[:, 0] = 1.0
    q, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=False, quant_type=quant_type)
    error = (bnb.functional.dequantize_4bit(q, state) - weight).abs()
    bound = requantization_error_bound(weight, quant_type=quant_type, double_quant=False)
    assert torch.all(error <= bound)
    assert error.max() > 0.99 * bound.max()


@pytest.mark.parametrize("quant_type,double_quant", QUANT_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_requantization_bound_holds_for_outliers_and_a_partial_last_block(quant_type, double_quant, dtype):
    torch.manual_seed(0)
    weight = torch.randn(37, 53) * torch.rand(37, 1)  # 1961 elements: the last block of 64 is partial
    weight[torch.rand_like(weight) < 0.01] *= 30  # outliers spread the block scales, which double quantization feels
    q, state = bnb.functional.quantize_4bit(weight.to(dtype), blocksize=64, compress_statistics=double_quant,
                                            quant_type=quant_type)
    error = (bnb.functional.dequantize_4bit(q, state).float() - weight).abs()
    bound = requantization_error_bound(weight, quant_type=quant_type, double_quant=double_quant, dtype=dtype)
    assert torch.all(error <= bound)


def test_merge_bound_scales_with_the_block_and_adds_the_double_quantized_scale_error():
    weight = torch.zeros(2, 64)
    weight[0, 3] = -2.0
    bound = requantization_error_bound(weight, quant_type="nf4", double_quant=False)
    assert torch.allclose(bound[0], torch.full((64,), 2 * HALF_STEP_4BIT["nf4"]), rtol=1e-5)
    assert torch.all(bound[1] == 0)  # an all-zero block is stored exactly
    # With double quantization both blocks may be off by the 8-bit error of the scales' spread around their mean (1).
    nested = requantization_error_bound(weight, quant_type="nf4", double_quant=True)
    assert torch.allclose(nested - bound, torch.full((2, 64), 0.0070313), rtol=1e-4)


def test_unmerge_restores_the_4bit_base_to_within_two_requantizations(llama_dir):
    model = get_peft_model(_load_4bit(llama_dir), LoftConfig(r=4))
    _randomise_factors(model, scale=0.05)
    layers = _loft_layers(model)
    original = {name: dequantize_4bit_weight(layer.get_base_layer()).float() for name, layer in layers.items()}
    with pytest.warns(UserWarning, match="requantizes"):
        model.merge_adapter()
    merged = {name: dequantize_4bit_weight(layer.get_base_layer()).float() for name, layer in layers.items()}
    with pytest.warns(UserWarning, match="requantizes"):
        model.unmerge_adapter()
    for name, layer in layers.items():
        assert not layer.merged
        delta = layer.get_delta_weight("default")
        state = layer.get_base_layer().weight.quant_state
        options = dict(quant_type=state.quant_type, blocksize=state.blocksize, double_quant=state.nested)
        # |W'' - W0| <= |W'' - (W' - BA)| + |W' - (W0 + BA)|: one bound for the unmerge, one for the merge.
        bound = requantization_error_bound(merged[name] - delta, **options) + requantization_error_bound(
            original[name] + delta, **options
        )
        restored = dequantize_4bit_weight(layer.get_base_layer()).float()
        assert torch.all((restored - original[name]).abs() <= bound), name
        assert not torch.equal(merged[name], original[name])  # the merge did change the 4-bit weight


def test_dequantize_reads_weights_repacked_for_the_cpu_kernel():
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), quant_type="nf4", module=layer).to("cpu")
    expected = dequantize_4bit_weight(layer).float()
    # What Linear4bit.forward does in eval mode on a CPU with AVX512-BF16 (which this machine may not have).
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    restored = dequantize_4bit_weight(layer).float()
    assert not layer.weight.quant_state.packing_format_for_cpu
    # The repacking stores the block scales in bf16: equal to within bf16 rounding of the scale.
    assert torch.allclose(restored, expected, rtol=2**-7, atol=0)


def _packable_llama_dir(tmp_path):
    """The tiny LLaMA widened to shapes bitsandbytes' CPU inference kernel takes (in >= 64, out a multiple of 32)."""
    from transformers import LlamaForCausalLM

    config = tiny_llama().config
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    return tmp_path


def _factor_grads(model, ids):
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_an_evaluation_leaves_every_4bit_layer_computing_and_passing_gradients_as_before(tmp_path):
    """On AVX512-BF16 CPUs bitsandbytes would switch layers to a layout without backward on the first eval forward."""
    model = load_qloft_model(_packable_llama_dir(tmp_path), LoftConfig(r=4, init_weights=False),
                             compute_dtype=torch.float32, gradient_checkpointing=False, device_map="cpu")
    ids = _batch()
    before_logits, before_grads = _logits(model, ids), _factor_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after_grads = _factor_grads(model, ids)
    assert torch.equal(_logits(model, ids), before_logits)
    assert after_grads.keys() == before_grads.keys()
    for name in before_grads:
        assert torch.equal(after_grads[name], before_grads[name]), name
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def test_set_cpu_inference_layout_puts_repacked_layers_back_and_can_allow_the_fast_kernel_again():
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, has_avx512bf16

    from loft_peft.quantization import set_cpu_inference_layout

    torch.manual_seed(0)
    model = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32))
    layer = model[0]
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), quant_type="nf4", module=layer).to("cpu")
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    assert set_cpu_inference_layout(model, False) == 1
    assert not layer.weight.quant_state.packing_format_for_cpu and not layer.support_avx512bf16_for_cpu
    x = torch.randn(3, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert set_cpu_inference_layout(model, True) == 1
    assert layer.support_avx512bf16_for_cpu == bool(has_avx512bf16())
    assert set_cpu_inference_layout(torch.nn.Linear(2, 2), False) == 0


# ---------------------------------------------------------------------------------------------------- bad input
def test_load_qloft_model_without_bitsandbytes_says_how_to_install(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        load_qloft_model(llama_dir, LoftConfig(r=4), device_map="cpu")


def test_the_package_works_without_bitsandbytes():
    """bitsandbytes is imported only for a 4-bit model: without it, LoFT on float layers is untouched."""
    import subprocess
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None  # as if not installed
        import torch
        from peft import get_peft_model
        import loft_peft, loft_peft.quantization
        from loft_peft import LoftConfig, create_loft_optimizer
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoftConfig(r=2, target_modules=["0"]))
        create_loft_optimizer(model, lr=1e-3)
        print(type(model.base_model.model[0]).__module__)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("loft_peft.tuner.layer")


@pytest.mark.parametrize(
    "options",
    [
        {"load_in_8bit": True},
        {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)},
        {"quantization_config": {"load_in_8bit": True}},
    ],
)
def test_load_qloft_model_refuses_8bit(llama_dir, options):
    with pytest.raises(ValueError, match="8-bit quantization is not supported"):
        load_qloft_model(llama_dir, LoftConfig(r=4), device_map="cpu", **options)


@pytest.mark.parametrize("value", ["8bit", "int8", 8])
def test_a_config_asking_for_8bit_is_refused(value):
    with pytest.raises(ValueError, match="8-bit quantization is not supported"):
        check_quantization(value)


@pytest.mark.parametrize("value,expected", [(None, None), ("none", None), (False, None), ("4bit", "4bit"),
                                            ("4-bit", "4bit"), (4, "4bit"), ("nf4", "4bit")])
def test_check_quantization_normalises_the_config_value(value, expected):
    assert check_quantization(value) == expected


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"quant_type": "int4"}, ValueError, "quant_type"),
        ({"compute_dtype": "fp8"}, ValueError, "compute_dtype"),
        ({"compute_dtype": torch.int8}, ValueError, "compute_dtype"),
        ({"compute_dtype": 16}, TypeError, "compute_dtype"),
        ({"double_quant": "yes"}, TypeError, "double_quant"),
        ({"factor_dtype": torch.float64}, ValueError, "factor_dtype"),
        ({"quantization_config": BitsAndBytesConfig(load_in_4bit=True)}, ValueError, "builds the 4-bit"),
        ({"load_in_4bit": True}, ValueError, "load_in_4bit"),
    ],
)
def test_load_qloft_model_rejects_bad_options(llama_dir, options, error, match):
    with pytest.raises(error, match=match):
        load_qloft_model(llama_dir, LoftConfig(r=4), device_map="cpu", **options)


def test_load_qloft_model_needs_a_loft_config(llama_dir):
    from peft import LoraConfig

    with pytest.raises(TypeError, match="LoftConfig"):
        load_qloft_model(llama_dir, LoraConfig(r=4), device_map="cpu")


# --------------------------------------------------------------------------------------------------------- recipe
def test_paper_qloft_recipe_config_loads_and_validates():
    from pathlib import Path

    from loft_peft.train import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / "qloft_llama3_8b_orcamath.yaml")
    config.validate()
    # Appendix F.2: LLaMA-3-8B in 4 bits, bf16, global batch 32, 256 tokens, AdamW, r = 16, 3 epochs.
    assert config.model_name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert (config.method, config.quantization, config.precision) == ("loft", "4bit", "bf16")
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps == 32
    assert config.block_size == 256
    assert config.rank == 16
    assert (config.max_steps, config.num_train_epochs) == (-1, 3)
    assert check_quantization(config.quantization) == "4bit"
# To append to tests/test_qloft.py together with the model.py change (model.diff).


def test_plain_route_refuses_an_8bit_model_instead_of_wrapping_it_as_float(llama_dir):
    base = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    with pytest.raises(TypeError, match="4-bit quantization only"):
        get_peft_model(base, LoftConfig(r=4))


def test_plain_route_an_evaluation_leaves_every_4bit_layer_passing_gradients_as_before(tmp_path):
    base = _load_4bit(_packable_llama_dir(tmp_path))
    model = get_peft_model(base, LoftConfig(r=4, init_weights=False))
    ids = _batch()
    before = _factor_grads(model, ids)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = _factor_grads(model, ids)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
