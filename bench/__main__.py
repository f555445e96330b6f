"""`python -m bench ...`: the benchmark (see bench/cli.py)."""

import sys

from .cli import main

sys.exit(main())
