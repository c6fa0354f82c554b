"""``python -m loft_peft.train``: the ``loft-train`` command."""

import sys

from .cli import main

sys.exit(main())
