"""`python -m memtool`: the same as the `memtool` command."""

import sys

from .cli import main

sys.exit(main())
