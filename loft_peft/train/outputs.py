"""What a ``loft-train`` run writes into ``output_dir``, and what it may do with a folder that is already there.

Files are written atomically; a finished run lists what it wrote in a manifest, which is all ``--overwrite``
removes; ``--resume`` starts from the last complete, readable checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .config import ConfigError, TrainConfig, load_config


# Files a finished run leaves in output_dir (besides the adapter / model files that save_pretrained chooses).
CONFIG_FILE = "config.yaml"
# The names a finished run wrote into output_dir; --overwrite removes exactly these (and checkpoints).
MANIFEST_FILE = ".loft-train-manifest.json"
LORA_EXPORT_DIR = "lora"  # the LoRA export of a LoFT adapter (export_lora)
METRICS_FILE = "metrics.json"
PLOT_FILE = "loss.png"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# The Trainer writes trainer_state.json last into a checkpoint folder, so a folder without it was cut short.
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"
# Fields that may differ when a run is resumed: they change how long it runs or what it reports, not what it trains.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to",
     "dataloader_num_workers", "output_dir", "eval_on_start"}
)


# ====================================================================================================== files
def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        # mkstemp makes the file private; the result should get the permissions any new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def _damaged_checkpoint_file(checkpoint: Path) -> Path | None:
    """The first file of a checkpoint that cannot be read back whole (safetensors header, torch zip archive)."""
    import zipfile

    from safetensors import safe_open

    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                        f.get_slice(key)
                if path.stat().st_size == 0:
                    return path
            elif path.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(path) as archive:
                    if archive.testzip() is not None:
                        return path
        except Exception:  # noqa: BLE001 - whatever the reader raises, the file is unusable
            return path
    return None


def _checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was written at (its ``trainer_state.json``)."""
    try:
        return int(json.loads((checkpoint / CHECKPOINT_COMPLETE_MARKER).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"--resume: {checkpoint / CHECKPOINT_COMPLETE_MARKER} is unreadable ({err})") from None


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` whose writing finished (it has ``trainer_state.json``), or ``None``.

    A run killed while saving leaves a newer, incomplete folder; resuming from the one before it is what works.
    """
    complete = [p for p in _checkpoints(Path(output_dir)) if (p / CHECKPOINT_COMPLETE_MARKER).is_file()]
    return complete[-1] if complete else None


def remove_incomplete_checkpoints(output_dir: Path) -> list[str]:
    """Remove the ``checkpoint-N`` folders a save cut short (no ``trainer_state.json``); returns their names.

    The Trainer writes a checkpoint in place; a Ctrl-C (or a kill) in the middle leaves a folder that cannot be resumed
    from, and that ``save_total_limit``'s rotation would count as a checkpoint.
    """
    removed = []
    for checkpoint in _checkpoints(Path(output_dir)):
        if not (checkpoint / CHECKPOINT_COMPLETE_MARKER).is_file():
            shutil.rmtree(checkpoint)
            removed.append(checkpoint.name)
    return removed


def check_output_dir(config: TrainConfig, *, resume: bool, overwrite: bool) -> Path | None:
    """Decide what the run may do with ``output_dir``; touches nothing.

    Returns:
        The checkpoint to resume from (``--resume``), else ``None``.

    Raises:
        ConfigError: the folder holds another run and neither flag was given, ``--resume`` finds no complete
            checkpoint or a config that differs in what it trains, or the path is not a folder.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {str(out)!r} exists and is not a folder")
    previous = []
    if out.is_dir():
        previous = [p.name for p in _checkpoints(out)] + [
            n for n in (CONFIG_FILE, METRICS_FILE, MANIFEST_FILE) if (out / n).exists()
        ]
        others = sorted(p.name for p in out.iterdir())
        if others and not previous:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ConfigError(
                f"output_dir {str(out)!r} is not empty ({shown}) and holds no loft-train run; choose a new or empty "
                "folder (a run would write README.md, config.yaml and the adapter files there)"
            )
    if resume:
        checkpoint = last_complete_checkpoint(out)
        if checkpoint is None:
            raise ConfigError(f"--resume: output_dir {str(out)!r} holds no complete checkpoint to resume from")
        damaged = _damaged_checkpoint_file(checkpoint)
        if damaged is not None:
            earlier = [p for p in _checkpoints(out) if p != checkpoint and (p / CHECKPOINT_COMPLETE_MARKER).is_file()
                       and _checkpoint_step(p) < _checkpoint_step(checkpoint) and _damaged_checkpoint_file(p) is None]
            fix = (f"remove {checkpoint.name} to resume from {earlier[-1].name}" if earlier
                   else "no earlier complete checkpoint is left; start again with --overwrite")
            raise ConfigError(f"--resume: {damaged} is truncated or corrupt; {fix}")
        done = _checkpoint_step(checkpoint)
        if config.max_steps > 0 and done >= config.max_steps:
            raise ConfigError(
                f"--resume: the run in {str(out)!r} already reached max_steps ({done} of {config.max_steps}); "
                "raise --max-steps to train further"
            )
        if (out / CONFIG_FILE).is_file():
            saved = load_config(out / CONFIG_FILE)
            changed = sorted(
                k for k, v in saved.to_dict().items() if v != getattr(config, k) and k not in RESUMABLE_CHANGES
            )
            if changed:
                raise ConfigError(
                    f"--resume: the config differs from the run in {str(out)!r} in {', '.join(changed)}; "
                    "resume with the same settings or start a new output_dir"
                )
        return checkpoint
    if previous and not overwrite:
        raise ConfigError(
            f"output_dir {str(out)!r} already holds a run ({', '.join(previous[:3])}); pass --resume to continue it "
            "or --overwrite to replace it"
        )
    return None


def clear_previous_run(out: Path) -> None:
    """For ``--overwrite``: remove what the previous run wrote (its manifest's list, checkpoints and result files)."""
    written = _read_manifest(out)
    for checkpoint in _checkpoints(out):
        shutil.rmtree(checkpoint)
    for name in {CONFIG_FILE, METRICS_FILE, PLOT_FILE, *written}:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if (out / MANIFEST_FILE).exists():
        (out / MANIFEST_FILE).unlink()


def _read_manifest(out: Path) -> list[str]:
    """The names a finished run wrote into ``out`` (``[]`` without a manifest); only plain names, never paths."""
    try:
        names = json.loads((out / MANIFEST_FILE).read_text())["written"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if isinstance(n, str) and n and "/" not in n and n not in (".", "..")]


def save_outputs(trainer, out: Path, metrics: dict, lora_export: bool) -> None:
    """Adapter (or model) and tokenizer, its LoRA export, metrics.json and loss.png, each moved into place whole."""
    from ..plotting import plot_run

    staging = Path(tempfile.mkdtemp(prefix=".save-", dir=out))
    try:
        trainer.save_model(str(staging))
        if lora_export:
            from ..export import export_lora

            export_lora(trainer.model, staging / LORA_EXPORT_DIR)
        written = sorted({*_read_manifest(out), *(item.name for item in staging.iterdir()), METRICS_FILE, PLOT_FILE,
                          CONFIG_FILE})
        write_atomic(out / MANIFEST_FILE, json.dumps({"written": written}, indent=1) + "\n")
        for item in staging.iterdir():
            target = out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2, default=float) + "\n")
    label = f"{metrics['method']} (r={metrics['rank']})" if metrics["rank"] else metrics["method"]
    plot_run(metrics["log_history"], out / PLOT_FILE, title=f"{metrics['model']}: {label}")


