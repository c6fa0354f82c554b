"""Print the exact versions installed in an environment as constraints.txt (torch, its CUDA packages and the project left out).

Usage: python .ci/freeze.py .venv-latest/bin/python > constraints.txt
"""

import subprocess
import sys

python = sys.argv[1]
frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True,
                        text=True).stdout.splitlines()
# torch and what a CUDA build of it brings are the installed torch's business, not this file's.
held = ("torch==", "loft-peft==", "nvidia-", "triton==")
versions = [line for line in frozen if "==" in line and not line.lower().startswith(held)]
print("# Exact versions the test suite last passed with; `make setup` (and so `make test`, `make demo` and CI)")
print("# installs with `pip install -c constraints.txt`. torch is not pinned here: an installed torch is kept.")
print("# Refresh with `make constraints` (runs `make test-latest`, then writes this file from that environment).")
print("\n".join(sorted(versions, key=str.lower)))
