"""``python -m edgetune.cli``: the same as the ``edgetune`` console script."""

import sys

from edgetune.cli import main

sys.exit(main())
