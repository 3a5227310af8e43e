"""``python -m saematch_core`` is the ``saematch`` command."""

from saematch_core.cli import main

raise SystemExit(main())
