"""``python -m engine``: the same entry point as the ``parablock`` console script."""
from engine.cli.main import main

raise SystemExit(main())
