"""The ``loft-train`` command on a tiny random LLaMA and a character tokenizer built offline; one slow real run."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loft_peft import train
from loft_peft.train import load_config, main

from .conftest import tiny_llama

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# 94 printable characters, the newline and <unk>: exactly tiny_llama's 96 token ids.
CHARACTERS = string.printable[:94] + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with a tiny random LLaMA and its character tokenizer, and a text file to train on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARACTERS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = root / "text.txt"
    text.write_text("".join(f"{i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)))
    return model_dir, text


def _argv(tiny, out: Path, *extra: str) -> list[str]:
    model_dir, text = tiny
    return [
        "--model-name-or-path", str(model_dir), "--data-files", str(text), "--block-size", "16",
        "--max-steps", "2", "--eval-steps", "2", "--save-steps", "2", "--logging-steps", "1",
        "--per-device-train-batch-size", "2", "--per-device-eval-batch-size", "4", "--max-eval-examples", "4",
        "--eval-on-start", "false", "--output-dir", str(out), *extra,
    ]


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("loft-train: error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------------------ a good run
def test_run_writes_adapter_metrics_plot_and_resolved_config(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(tiny, out, "--rank", "4")) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("method", "rank", "steps", "lr", "train_loss", "eval_loss", "eval_perplexity", "tokens_per_second",
                "seconds_per_step", "seconds_per_step_with_eval", "peak_memory_mb", "trainable_parameters",
                "total_parameters", "log_history", "seed", "target_modules", "versions"):
        assert key in metrics, key
    assert metrics["target_modules"] == ["down_proj", "k_proj", "q_proj", "up_proj", "v_proj"]  # resolved defaults
    assert {"loft-peft", "torch", "transformers", "peft"} <= set(metrics["versions"]) and metrics["seed"] == 0
    assert metrics["seconds_per_step_with_eval"] >= metrics["seconds_per_step"]
    assert (metrics["method"], metrics["rank"], metrics["steps"], metrics["lr"]) == ("loft", 4, 2, 2e-4)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 0 < metrics["trainable_parameters"] < metrics["total_parameters"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    resolved = load_config(out / "config.yaml")
    assert (resolved.rank, resolved.max_steps, resolved.output_dir) == (4, 2, str(out))

    from peft import PeftModel

    adapter = load_file(out / "adapter_model.safetensors")
    reloaded = PeftModel.from_pretrained(tiny_llama(), out)
    for name, tensor in reloaded.named_parameters():
        if "loft_" in name:
            saved = next(v for k, v in adapter.items() if name.replace(".default", "") == k)
            torch.testing.assert_close(tensor, saved, rtol=0, atol=0)


def test_run_writes_the_lora_export_next_to_the_adapter_unless_told_not_to(tiny, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(tiny, out, "--rank", "4")) == 0
    lora_config = json.loads((out / "lora" / "adapter_config.json").read_text())
    assert (lora_config["peft_type"], lora_config["r"], lora_config["lora_alpha"]) == ("LORA", 4, 4)
    loft = load_file(out / "adapter_model.safetensors")
    lora = load_file(out / "lora" / "adapter_model.safetensors")
    assert {k.replace(".lora_A.weight", ".loft_A").replace(".lora_B.weight", ".loft_B") for k in lora} == set(loft)
    assert all(torch.equal(v, loft[k.replace(".lora_A.weight", ".loft_A").replace(".lora_B.weight", ".loft_B")])
               for k, v in lora.items())
    assert "## LoFT adapter" in (out / "README.md").read_text()  # the LOFT card says how to load and export it
    # --overwrite replaces the export too; --export-lora false writes none.
    assert main(_argv(tiny, out, "--rank", "4", "--export-lora", "false", "--overwrite")) == 0
    assert not (out / "lora").exists()


@pytest.mark.parametrize("method", ["lora", "dora", "full", "loft-simple", "loft-muon"])
def test_the_same_command_trains_every_method(tiny, tmp_path, method):
    out = tmp_path / method
    assert main(_argv(tiny, out, "--method", method, "--rank", "4")) == 0
    assert json.loads((out / "metrics.json").read_text())["method"] == method
    if method == "full":
        assert (out / "model.safetensors").is_file()
        return
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    if method in ("lora", "dora"):
        # The paper's LoRA and DoRA baselines use alpha = 2r.
        assert (adapter_config["lora_alpha"], adapter_config["use_dora"]) == (8, method == "dora")
    else:
        assert adapter_config["peft_type"] == "LOFT"


def test_quantize_is_an_alias_of_the_quantization_field():
    from loft_peft.train import resolve_config

    assert resolve_config(["--quantize", "4bit"])[0].quantization == "4bit"
    assert resolve_config(["--quantization", "4bit"])[0].quantization == "4bit"
    assert resolve_config([])[0].quantization == "none"


def test_cli_values_override_the_config_file(tiny, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("rank: 2\nlearning_rate: 1e-3\nmethod: lora\n")
    resolved, _ = train.resolve_config(["--config", str(config), "--rank", "6"])
    assert (resolved.rank, resolved.learning_rate, resolved.method) == (6, 1e-3, "lora")


# --------------------------------------------------------------------------------------------------------- bad input
def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "unknown flag": (lambda d: ["--learning-rat", "1e-3"], "unrecognized arguments: --learning-rat"),
    "unknown method": (lambda d: ["--method", "qlora"], "unknown method 'qlora'"),
    "rank below one": (lambda d: ["--rank", "0"], "rank must be >= 1"),
    "rank above the layer width": (lambda d: ["--rank", "5000"], "rank r=5000 is above the width of target module"),
    "learning rate not a number": (lambda d: ["--learning-rate", "nan"], "learning_rate must be a finite number"),
    "infinite learning rate": (lambda d: ["--learning-rate", "inf"], "learning_rate must be a finite number"),
    "rank not an integer": (lambda d: ["--rank", "two"], "--rank must be an integer"),
    "missing data file": (lambda d: ["--data-files", str(d / "missing.txt")], "missing.txt' not found"),
    "empty text file": (lambda d: ["--data-files", _write(d / "empty.txt", "")], "empty.txt' is empty"),
    "blank text file": (lambda d: ["--data-files", _write(d / "blank.txt", "\n  \n")], "blank.txt' is empty"),
    "empty jsonl file": (lambda d: ["--data-files", _write(d / "empty.jsonl", "")], "empty.jsonl' is empty"),
    "malformed jsonl file": (lambda d: ["--data-files", _write(d / "bad.jsonl", '{"text": "to be"\n' * 40)],
                             "bad.jsonl as json"),
    "8-bit quantization": (lambda d: ["--quantization", "8bit"], "8-bit quantization is not supported"),
    "unknown quantization": (lambda d: ["--quantize", "2bit"], "Unknown quantization '2bit'"),
    "unknown config key": (lambda d: ["--config", _write(d / "a.yaml", "learning_rat: 0.1\n")],
                           "unknown config key 'learning_rat'"),
    "wrong config type": (lambda d: ["--config", _write(d / "b.yaml", "rank: '8'\n")],
                          "config key 'rank' must be an integer"),
    "missing config file": (lambda d: ["--config", str(d / "none.yaml")], "none.yaml' not found"),
    "missing model folder": (lambda d: ["--model-name-or-path", str(d / "no-model")], "no-model' not found"),
    "resume without a checkpoint": (lambda d: ["--resume"], "no complete checkpoint"),
    "positional template field": (
        lambda d: ["--data-files", _write(d / "r.jsonl", '{"q": "to be"}\n' * 40), "--text-template", "Q: {}"],
        "text_template fields must be record field names",
    ),
    "attribute in a template field": (
        lambda d: ["--data-files", _write(d / "r.jsonl", '{"q": "to be"}\n' * 40), "--text-template", "{q.x}"],
        "['q.x']",
    ),
    "unbalanced template brace": (
        lambda d: ["--data-files", _write(d / "r.jsonl", '{"q": "to be"}\n' * 40), "--text-template", "{q"],
        "not a valid format string",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_error_and_writes_nothing(case, tiny, tmp_path, capsys):
    extra, expected = BAD_INPUTS[case]
    out = tmp_path / "out"
    argv = _argv(tiny, out)
    # Later flags win, so appending overrides the good values.
    assert main(argv + extra(tmp_path)) == 2
    assert expected in _one_error_line(capsys)
    assert not out.exists()


def test_output_dir_holding_another_run_is_refused_then_replaced_with_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    assert main(_argv(tiny, out)) == 2
    message = _one_error_line(capsys)
    assert "checkpoint-7" in message and "--resume" in message and "--overwrite" in message
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-7"]

    assert main(_argv(tiny, out, "--overwrite")) == 0
    assert not (out / "checkpoint-7").exists()
    assert (out / "metrics.json").is_file()


def test_overwrite_leaves_no_model_file_of_the_previous_run(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(tiny, out, "--method", "full")) == 0
    assert (out / "model.safetensors").is_file()
    (out / "notes.txt").write_text("kept")  # not something a run writes
    assert main(_argv(tiny, out, "--method", "loft", "--overwrite")) == 0
    assert not (out / "model.safetensors").exists()
    assert (out / "adapter_model.safetensors").is_file() and (out / "notes.txt").read_text() == "kept"


def test_output_dir_holding_the_users_own_files_is_refused_and_left_alone(tiny, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    assert main(_argv(tiny, out)) == 2
    assert "is not empty (README.md) and holds no loft-train run" in _one_error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"] and (out / "README.md").read_text() == "my notes"
    assert main(_argv(tiny, out, "--overwrite")) == 2  # --overwrite replaces a run, not somebody's folder
    assert (out / "README.md").read_text() == "my notes"


def test_overwrite_removes_exactly_what_the_previous_run_wrote(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(_argv(tiny, out)) == 0
    manifest = json.loads((out / ".loft-train-manifest.json").read_text())["written"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "lora", "metrics.json", "loss.png",
            "config.yaml"} <= set(manifest)
    (out / "tokenizer.model").write_text("the user's, though a tokenizer file name")
    assert main(_argv(tiny, out, "--overwrite", "--export-lora", "false")) == 0
    assert (out / "tokenizer.model").read_text() == "the user's, though a tokenizer file name"
    assert not (out / "lora").exists() and (out / "adapter_model.safetensors").is_file()


def test_fp16_on_a_machine_without_cuda_is_refused(tiny, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, where fp16 is supported")
    assert main(_argv(tiny, tmp_path / "out", "--precision", "fp16")) == 2
    assert "fp16 needs a CUDA GPU" in _one_error_line(capsys)


# ------------------------------------------------------------------------------------------------ interrupt, resume
def test_interrupted_run_resumes_from_its_last_complete_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    from loft_peft.trainer import LoftCallback

    common = ("--max-steps", "4", "--dropout", "0.1", "--max-grad-norm", "0.01")
    uninterrupted = tmp_path / "uninterrupted"
    assert main(_argv(tiny, uninterrupted, *common)) == 0

    # Ctrl-C during step 3, after checkpoint-2 was written.
    original = LoftCallback.on_step_end

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt
        return original(self, args, state, control, **kwargs)

    out = tmp_path / "interrupted"
    monkeypatch.setattr(LoftCallback, "on_step_end", interrupt)
    assert main(_argv(tiny, out, *common)) == 130
    assert "checkpoint-2" in capsys.readouterr().err
    monkeypatch.setattr(LoftCallback, "on_step_end", original)
    # A kill while the Trainer wrote checkpoint-3 would leave a folder without trainer_state.json: it is skipped.
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"")

    assert main(_argv(tiny, out, *common, "--resume")) == 0
    assert not (out / "checkpoint-3").exists()  # the cut-short folder is gone, not left for the rotation to count
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    # train_loss covers the whole run, not only the resumed steps (logging_steps=1: the mean of the step losses).
    expected = json.loads((uninterrupted / "metrics.json").read_text())["train_loss"]
    assert metrics["train_loss"] == pytest.approx(expected, rel=1e-5)
    want = load_file(uninterrupted / "adapter_model.safetensors")
    got = load_file(out / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6


def test_resume_of_a_finished_run_is_refused_and_changes_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(tiny, out)) == 0
    capsys.readouterr()
    before = (out / "metrics.json").read_text()
    assert main(_argv(tiny, out, "--resume")) == 2
    assert "already reached max_steps (2 of 2)" in _one_error_line(capsys)
    assert (out / "metrics.json").read_text() == before


def test_resume_with_a_different_training_setup_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_argv(tiny, out)) == 0
    capsys.readouterr()
    assert main(_argv(tiny, out, "--resume", "--rank", "2", "--max-steps", "3")) == 2
    assert "differs from the run" in _one_error_line(capsys)


# ------------------------------------------------------------------------------------------------- other tasks
def _tiny_vit_and_images(tmp_path, corrupt=False):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    model_dir = tmp_path / "vit"
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, num_labels=2)
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    files = []
    for label, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            path = tmp_path / "images" / label / f"{i}.png"
            if corrupt:
                path.write_bytes(b"not a PNG file")
            else:
                Image.new("RGB", (40, 40), tuple(c + 5 * i for c in colour)).save(path)
            files.append(str(path))
    return ["--task", "image-classification", "--model-name-or-path", str(model_dir), "--data-files", *files,
            "--eval-fraction", "0.25", "--max-steps", "2", "--eval-steps", "2", "--save-steps", "2",
            "--per-device-train-batch-size", "4", "--eval-on-start", "false"]


def test_image_classification_trains_the_adapter_on_the_default_vit_targets_and_the_head(tmp_path):
    out = tmp_path / "out"
    assert main(_tiny_vit_and_images(tmp_path) + ["--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    saved = load_file(out / "adapter_model.safetensors")
    # The default targets: Q, K, V and the three dense layers of each of the 2 blocks, whatever transformers names them.
    assert len([k for k in saved if "loft_A" in k]) == 2 * 6
    assert any("classifier" in k for k in saved)


def test_images_that_cannot_be_preprocessed_give_one_line_error_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = _tiny_vit_and_images(tmp_path, corrupt=True) + ["--output-dir", str(out)]
    capsys.readouterr()  # the set-up's own progress bars
    assert main(argv) == 2
    # The error is one line, after the progress bars of the data loading that preceded it.
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("loft-train: error: could not preprocess the first training example")
    assert "cannot identify image file" in last
    assert not out.exists()


@pytest.mark.parametrize("method", ["lora", "loft"])
def test_adapter_on_a_4bit_base_model_trains(tiny, tmp_path, method):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    # bitsandbytes quantizes in blocks of 64 inputs, so the layers need at least 64 input features.
    model_dir = tmp_path / "model64"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny[0]).save_pretrained(model_dir)
    out = tmp_path / "out"
    # Evaluating first: on the CPU, bitsandbytes may switch 4-bit layers to a kernel without a backward when they
    # run in inference mode, after which no gradient would reach the first layer.
    flag = "--quantize" if method == "loft" else "--quantization"  # the short alias and the field's own flag
    assert main(_argv((model_dir, tiny[1]), out, "--method", method, flag, "4bit",
                      "--eval-on-start", "true")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantization"] == "4bit" and math.isfinite(metrics["eval_loss"])
    # B starts at zero in both methods and moves only if a gradient reached it through the layers above.
    first_b = [v for k, v in load_file(out / "adapter_model.safetensors").items()
               if "layers.0." in k and ("lora_B" in k or "loft_B" in k)]
    assert first_b and all(b.abs().max() > 0 for b in first_b)


# --------------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_default_run_fine_tunes_the_real_smollm2_offline(tmp_path):
    out = tmp_path / "default"
    argv = ["--max-steps", "3", "--eval-steps", "3", "--save-steps", "3", "--max-eval-examples", "8",
            "--eval-on-start", "false", "--output-dir", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["method"] == "loft"
    # A pretrained LM on English verse: perplexity in the tens (a random 49k-vocabulary model would give ~49,000).
    assert metrics["eval_perplexity"] < 200
    assert metrics["trainable_parameters"] < 0.02 * metrics["total_parameters"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    # The adapter and its model card name the model, not the local cache folder of its offline copy.
    for folder in (out, out / "lora"):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == (
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        )
        assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in (folder / "README.md").read_text()
        assert ".cache" not in (folder / "README.md").read_text()


def test_a_trainer_option_from_the_command_line_reaches_the_trainer_and_the_loft_optimizer(tiny, tmp_path):
    from transformers import TrainerCallback

    from loft_peft.trainer import unwrap_loft_optimizer

    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen["args"] = (args.adam_epsilon, args.adam_beta2, args.label_smoothing_factor)
            seen["optimizer"] = unwrap_loft_optimizer(optimizer).param_groups[0]["eps"]

    config, flags = train.resolve_config(_argv(tiny, tmp_path / "out", "--adam-epsilon", "1e-4", "--adam-beta2",
                                               "0.99", "--label-smoothing-factor", "0.05"))
    train.run(config, callbacks=(Probe(),))
    assert seen == {"args": (1e-4, 0.99, 0.05), "optimizer": 1e-4}
    assert "adam_epsilon: 0.0001" in (tmp_path / "out" / "config.yaml").read_text()


def test_logs_are_readable_lines_without_terminal_escape_codes(tiny, tmp_path, capsys):
    assert main(_argv(tiny, tmp_path / "out", "--max-grad-norm", "0.01")) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert any(line.startswith("step 1/2 | loss ") and "| grad_norm " in line and "moved B" in line for line in lines)
    assert any("eval_loss" in line and "perplexity" in line for line in lines)
    assert "{'loss'" not in captured.out and "\x1b[" not in captured.out + captured.err


def test_format_log_writes_numbers_as_numbers():
    line = train.format_log({"loss": 3.21456, "grad_norm": 0.5, "learning_rate": 2e-4, "loft_moved_B": 1.0,
                             "loft_moved_A": 0.0, "epoch": 0.1}, 3, 40)
    assert line == "step 3/40 | loss 3.215 | grad_norm 0.5 | lr 2.00e-04 | moved B"


@pytest.mark.parametrize("name", ["optimizer.pt", "adapter_model.safetensors"])
def test_resume_from_a_truncated_checkpoint_file_names_it_and_the_usable_checkpoint(tiny, tmp_path, capsys, name):
    out = tmp_path / "out"
    assert main(_argv(tiny, out, "--max-steps", "4", "--save-total-limit", "3")) == 0
    damaged = out / "checkpoint-4" / name
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    capsys.readouterr()
    assert main(_argv(tiny, out, "--max-steps", "6", "--resume")) == 2
    line = _one_error_line(capsys)
    assert f"checkpoint-4/{name} is truncated or corrupt" in line and "resume from checkpoint-2" in line


def test_ctrl_c_while_a_checkpoint_is_written_leaves_no_incomplete_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    original = Trainer._save_checkpoint

    def interrupted_save(self, model, trial):
        if self.state.global_step == 4:
            folder = Path(self.args.output_dir) / "checkpoint-4"
            folder.mkdir()
            (folder / "adapter_model.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
        return original(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", interrupted_save)
    out = tmp_path / "out"
    assert main(_argv(tiny, out, "--max-steps", "4")) == 130
    err = capsys.readouterr().err
    assert "removed checkpoint-4" in err and "resume from" in err and "checkpoint-2" in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
