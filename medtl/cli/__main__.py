"""``python -m medtl.cli``: the ``medtl`` command."""

from __future__ import annotations

import sys

from medtl.cli import main

sys.exit(main())
