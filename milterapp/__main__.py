"""``python -m milterapp``: the command line."""

import sys

from milterapp.cli import main

sys.exit(main())
