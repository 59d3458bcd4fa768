"""batchexec: run batches of LLM prompts against many models; results as CSV and XLSX.

The top level is lazy: ``import batchexec.templating`` (or any other part)
loads no more than that part needs; ``Settings`` and ``create_app`` are
imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchexec.config import Settings
    from batchexec.web.app import create_app

__all__ = ["Settings", "create_app"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Settings":
        from batchexec.config import Settings

        return Settings
    if name == "create_app":
        from batchexec.web.app import create_app

        return create_app
    raise AttributeError(f"module 'batchexec' has no attribute {name!r}")
