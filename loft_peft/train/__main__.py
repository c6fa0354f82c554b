"""``python -m loft_peft.train``: the ``loft-train`` command."""

import sys

from .main import main

sys.exit(main())
