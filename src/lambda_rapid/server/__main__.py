"""``python -m lambda_rapid.server``: the same as the ``lambda-server`` command."""

import sys

from .cli import main

sys.exit(main())
