"""``python -m ffnfusion.cli``: the same as the ``ffnfusion`` command."""

import sys

from ffnfusion.cli import main

sys.exit(main())
