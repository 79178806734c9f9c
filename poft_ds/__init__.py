"""poft-ds: preference-oriented supervised fine-tuning (PoFT) on DeepSpeed."""

from pathlib import Path

__version__ = "0.1.0"

# The repository checkout (for the shipped ds_configs/ and examples/ in an editable install).
REPO_ROOT = Path(__file__).resolve().parent.parent
