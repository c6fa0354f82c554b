"""``python -m loft_peft.train``: the ``loft-train`` command."""

import sys

from .cli import command

sys.exit(command())
