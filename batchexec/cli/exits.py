"""Exit codes of ``python -m batchexec``."""

#: Every row succeeded; for ``submit`` without ``--wait``, the server accepted the batch.
EXIT_OK = 0
#: The batch ran but some rows did not succeed, or the server could not be reached.
EXIT_FAILED = 1
#: Bad input or configuration; nothing was sent to a model.
EXIT_USAGE = 2
#: Stopped by Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130
