"""``python -m rotatekv``: the command line."""

from .cli import main

raise SystemExit(main())
