"""``python -m batchexec``."""

from batchexec.cli import main

raise SystemExit(main())
