"""poft-ds: preference-oriented supervised fine-tuning (PoFT) on DeepSpeed."""

import sysconfig
from pathlib import Path

__version__ = "0.1.0"

# The repository checkout (an editable install), or site-packages (a wheel).
REPO_ROOT = Path(__file__).resolve().parent.parent


def _shipped_root() -> Path:
    """Where the shipped `ds_configs/` and `launch/` live: the checkout, or the wheel's data files
    (`<prefix>/share/poft-ds`, see `[tool.setuptools.data-files]` in pyproject.toml)."""
    if (REPO_ROOT / "ds_configs").is_dir() and (REPO_ROOT / "launch").is_dir():
        return REPO_ROOT
    return Path(sysconfig.get_path("data")) / "share" / "poft-ds"


SHIPPED_ROOT = _shipped_root()
