"""``python -m fourbit``: the ``fourbit`` command."""

import sys

from .tools.cli import main

sys.exit(main())
