"""`python -m retrofit ...` (also what `accelerate launch -m retrofit ...` runs)."""

import sys

from .cli import main

sys.exit(main())
