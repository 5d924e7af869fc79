"""``python -m batch`` is the ``hemaray`` command."""

from batch.cli import main

raise SystemExit(main())
