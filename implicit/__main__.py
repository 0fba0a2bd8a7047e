"""``python -m implicit``: the ``implicit`` command."""

import sys

from .cli import main

sys.exit(main())
