"""``python -m watcher.cli``."""

import sys

from watcher.cli.main import main

sys.exit(main())
