"""`python cli/bso_cache_cli.py ARGS`: the `bso-cache` command line from a checkout (bso_cache/cli/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bso_cache.cli.app import main  # noqa: E402

if __name__ == "__main__":
    main()
