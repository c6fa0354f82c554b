"""The YAML configs in configs/ and the config machinery: types, the command line, the paper's recipes."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from loft_peft.train import ConfigError, TrainConfig, config_from_mapping, config_to_yaml, load_config, resolve_config
from loft_peft.train.config import _unwrap_optional

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TRAIN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("accelerate"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates(path):
    load_config(path).validate()


def test_default_yaml_is_the_embedded_default():
    assert load_config(CONFIGS / "default.yaml") == TrainConfig()


def test_commonsense_config_is_the_papers_llama3_recipe():
    c = load_config(CONFIGS / "commonsense_llama3_8b.yaml")
    assert "Llama-3-8B" in c.model_name_or_path
    assert (c.rank, c.learning_rate, c.dropout) == (16, 1e-4, 0.05)
    assert c.per_device_train_batch_size * c.gradient_accumulation_steps == 16
    assert (c.max_steps, c.num_train_epochs, c.lr_scheduler_type, c.warmup_steps) == (-1, 3.0, "linear", 100.0)
    assert set(c.target_modules) == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}


def test_vit_config_is_the_papers_image_classification_recipe():
    c = load_config(CONFIGS / "vit_base_image_classification.yaml")
    assert c.task == "image-classification" and "vit-base" in c.model_name_or_path
    assert (c.learning_rate, c.per_device_train_batch_size * c.gradient_accumulation_steps) == (5e-4, 64)
    assert (c.max_steps, c.num_train_epochs, c.lr_scheduler_type, c.warmup_steps, c.dropout) == (
        -1, 3.0, "linear", 0.1, 0.1)
    # Q, K, V and Dense under transformers 5 names (the MLP's fc1 / fc2 and the attention output are the Dense layers).
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"} <= set(c.target_modules)


def test_gpt2_config_is_the_papers_wikitext2_run():
    c = load_config(CONFIGS / "gpt2_wikitext2.yaml")
    assert (c.dataset_name, c.dataset_config, c.eval_split) == ("wikitext", "wikitext-2-raw-v1", "validation")
    assert (c.rank, c.learning_rate, c.lr_scheduler_type, c.max_steps, c.num_train_epochs) == (
        4, 2e-4, "linear", -1, 1.0)
    assert c.per_device_train_batch_size * c.gradient_accumulation_steps == 64


def test_resolved_yaml_reads_back_as_the_same_config():
    config = dataclasses.replace(TrainConfig(), method="dora", rank=3, target_modules=["q_proj"], lora_alpha=5.0)
    assert config_from_mapping(yaml.safe_load(config_to_yaml(config))) == config


def test_yaml_exponent_without_a_dot_is_read_as_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 as the string "1e-4"; a float field takes it as the number it spells.
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1e-4\nwarmup_steps: 10\n")
    config = load_config(path)
    assert (config.learning_rate, config.warmup_steps) == (1e-4, 10.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rank: 8.5\n", "config key 'rank' must be an integer; got 8.5"),
        ("rank: true\n", "config key 'rank' must be an integer"),
        ("learning_rate: fast\n", "config key 'learning_rate' must be a number"),
        ("gradient_checkpointing: 'yes'\n", "config key 'gradient_checkpointing' must be true or false"),
        ("method: null\n", "config key 'method' must be a string; got null"),
        ("target_modules: [1, 2]\n", "config key 'target_modules' must be a list of strings or none"),
        ("ranks: 8\n", "unknown config key 'ranks'"),
        ("- rank\n", "must be a mapping"),
        ("rank: [\n", "is not valid YAML"),
    ],
)
def test_bad_yaml_is_rejected_with_a_message_naming_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


# Values for the command line, per field: valid for validate(), and different from the default.
_STRING_SAMPLES = {"method": "dora", "task": "image-classification", "precision": "bf16", "quantization": "4bit",
                   "lr_scheduler_type": "cosine"}
_INT_SAMPLES = {"max_steps": "7", "rank": "3"}


def _sample(name: str, tp) -> tuple[list[str], object]:
    base, _ = _unwrap_optional(tp)
    if typing.get_origin(base) is list:
        return ["a.txt", "b.txt"], ["a.txt", "b.txt"]
    if base is bool:
        value = not getattr(TrainConfig(), name)
        return [str(value).lower()], value
    if base is int:
        text = _INT_SAMPLES.get(name, "3")
        return [text], int(text)
    if base is float:
        return ["0.25"], 0.25
    text = _STRING_SAMPLES.get(name, "some-value")
    return [text], text


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig) if f.name != "trainer_args"])
def test_every_field_can_be_set_on_the_command_line(field):
    values, expected = _sample(field, typing.get_type_hints(TrainConfig)[field])
    context = ["--method", "loft-simple"] if field == "loft_simple_rescale" else []  # refused with other methods
    config, _ = resolve_config([*context, "--" + field.replace("_", "-"), *values])
    assert getattr(config, field) == expected
    assert getattr(TrainConfig(), field) != expected


def test_none_on_the_command_line_clears_an_optional_field():
    config, _ = resolve_config(["--max-eval-examples", "none"])
    assert config.max_eval_examples is None


# ------------------------------------------------------------------------------- TrainingArguments pass through
@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--adam-epsilon", "1e-4"], {"adam_epsilon": 1e-4}),
        (["--tf32", "false", "--label-smoothing-factor", "0.1"], {"tf32": False, "label_smoothing_factor": 0.1}),
        (["--lr-scheduler-kwargs", '{"min_lr": 1e-6}'], {"lr_scheduler_kwargs": '{"min_lr": 1e-6}'}),
        (["--torch-compile"], {"torch_compile": True}),
    ],
)
def test_every_other_trainer_option_works_on_the_command_line_with_its_type(flags, expected):
    config, _ = resolve_config(flags)
    assert config.trainer_args == expected
    for name, value in expected.items():
        assert type(config.trainer_args[name]) is type(value)


def test_trainer_options_in_yaml_are_top_level_keys_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rank: 4\nadam_epsilon: 1e-4\nadam_beta2: 0.99\n")  # YAML 1.1 reads 1e-4 as a string
    config = load_config(path)
    assert config.trainer_args == {"adam_epsilon": 1e-4, "adam_beta2": 0.99}
    (tmp_path / "resolved.yaml").write_text(config_to_yaml(config))
    assert load_config(tmp_path / "resolved.yaml") == config


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--adam-epsilon", "tiny"], "'adam_epsilon' must fit TrainingArguments.adam_epsilon"),
        (["--adam-epsilonn", "1e-4"], "unrecognized arguments: --adam-epsilonn"),
        (["--optim", "adafactor"], "optim is not used with method loft"),
        (["--adam-epsilon", "nan"], "adam_epsilon must be a finite number"),
        (["--bf16", "true"], "bf16 is managed by loft-train (set precision: bf16)"),
        (["--eval_strategy", "no"], "eval_strategy is managed by loft-train (it evaluates every eval_steps)"),
    ],
)
def test_bad_trainer_options_are_one_line_errors(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(flags)


def test_an_unknown_yaml_key_suggests_a_trainer_option_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adam_epsilom: 1e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'adam_epsilon'"):
        load_config(path)


def test_plain_optim_is_allowed_for_the_baselines():
    config, _ = resolve_config(["--method", "lora", "--optim", "adafactor"])
    assert config.trainer_args == {"optim": "adafactor"}


@pytest.mark.parametrize("name", ["commonsense_llama3_8b", "gpt2_wikitext2", "qloft_llama3_8b_orcamath",
                                  "vit_base_image_classification"])
def test_paper_recipes_use_the_authors_eps(name):
    assert load_config(CONFIGS / f"{name}.yaml").trainer_args["adam_epsilon"] == 1e-4


def test_flags_take_the_underscore_spelling_of_hf_scripts_too():
    config, _ = resolve_config(["--max_steps", "7", "--learning_rate", "1e-3", "--adam_epsilon", "1e-6"])
    assert (config.max_steps, config.learning_rate, config.trainer_args) == (7, 1e-3, {"adam_epsilon": 1e-6})
