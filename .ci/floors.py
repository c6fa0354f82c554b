"""Print pyproject.toml's lower bounds as exact pins (a pip constraints file), for `make test-oldest`.

Every `name>=X` of the dependencies and of the extras `make setup` installs ([dev] and what it includes) becomes
`name==X`; torch is left out (the installed torch is held: another torch is a multi-GB CUDA download).
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in project.get("optional-dependencies", {}).values():
    requirements += [r for r in extra if not r.startswith("loft-peft")]
pins = {}
for requirement in requirements:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+).*", requirement)
    if match is None:
        sys.exit(f"floors.py: error: {requirement!r} has no `>=` lower bound; every dependency needs one")
    name, floor = match.group(1).lower(), match.group(3)
    if name != "torch":
        pins[name] = floor
print("\n".join(f"{name}=={floor}" for name, floor in sorted(pins.items())))
