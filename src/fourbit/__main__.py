"""``python -m fourbit``: the ``fourbit`` command."""

import sys

from .cli import main

sys.exit(main())
