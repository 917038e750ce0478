"""``python -m robustfl_lib``: see :mod:`robustfl_lib.cli`."""

import sys

from .cli import main

sys.exit(main())
