"""The README's quickstart runs as written (on the real, offline SmolLM2-135M)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_code() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_is_at_most_fifteen_lines():
    code_lines = [line for line in _quickstart_code().splitlines() if line.strip()]
    assert len(code_lines) <= 15


@pytest.mark.slow
def test_readme_quickstart_runs_and_saves_a_loft_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_quickstart_code(), str(README), "exec"), {})
    config = (tmp_path / "smollm2-loft" / "adapter_config.json").read_text()
    assert '"peft_type": "LOFT"' in config
