"""The scripts that check what this machine cannot measure still run here, so that they work when a GPU is lent."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    gpu_check = _script("gpu_check")
    output = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--layers", "1", "--batch", "1", "--seq", "16", "--steps",
                           "1", "--ranks", "4", "--output", str(output)]) == 0
    text = capsys.readouterr().out
    assert "LoFT r=4:" in text and "LoFT compile=True r=4:" in text
    assert "correctness: largest relative difference 0.00e+00" in text
    assert output.is_file()
