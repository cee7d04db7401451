"""``python -m proxjax.cli``."""

import sys

from proxjax.cli.main import main

sys.exit(main())
