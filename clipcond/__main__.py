"""``python -m clipcond``: the ``clipcond`` command line (clipcond/cli.py)."""

from clipcond.cli import main

raise SystemExit(main())
