"""``python -m otaguard``."""

import sys

from otaguard.cli import main

sys.exit(main())
