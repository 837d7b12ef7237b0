"""``python -m neatlm ...`` (used by torchrun) is the ``neat`` command."""

import sys

from .cli import main

sys.exit(main())
