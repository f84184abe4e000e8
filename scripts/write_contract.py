"""Write the on-disk contract (bso_cache.schemas.contract) into schemas/ at the repository's root.

Run it only when the cache format changes on purpose; tests/test_contract.py fails until it is.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bso_cache.schemas import contract  # noqa: E402

for name, document in contract().items():
    (ROOT / "schemas" / name).write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote schemas/{name}")
