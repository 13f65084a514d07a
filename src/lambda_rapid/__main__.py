"""``python -m lambda_rapid ...`` runs the daemon exactly as the console script does."""

import sys

from .cli import main

sys.exit(main())
