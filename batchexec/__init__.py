"""batchexec: run batches of LLM prompts against many models; results as CSV and XLSX."""

from batchexec.config import Settings
from batchexec.web.app import create_app

__all__ = ["Settings", "create_app"]
__version__ = "0.1.0"
