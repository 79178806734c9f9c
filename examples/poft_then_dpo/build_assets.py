"""Build the tiny models and data (deterministic, offline) this example trains: python build_assets.py [folder]."""

import sys
from pathlib import Path

from poft_ds.tiny import build_assets

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "assets"
    print(f"tiny assets written to {build_assets(out)}")
