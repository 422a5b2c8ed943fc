"""``python -m fitmap.cli``: the same as the ``fitmap`` command."""

import sys

from fitmap.cli import main

sys.exit(main())
