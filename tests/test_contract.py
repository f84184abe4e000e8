"""The cache format is pinned in schemas/ (as safetensors pins its header): the code produces
exactly those documents, and a built cache follows them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from bso_cache import schemas as S

PINNED = Path(__file__).resolve().parents[1] / "schemas"


def test_the_code_produces_the_pinned_contract():
    for name, document in S.contract().items():
        assert json.loads((PINNED / name).read_text()) == document, (
            f"schemas/{name} differs from bso_cache.schemas: a change of the cache format; if deliberate, "
            f"run scripts/write_contract.py and say so in the commit")


def test_a_built_cache_follows_the_pinned_contract(demo_cache):
    shard = json.loads((PINNED / "shard.schema.json").read_text())
    files = sorted(p for p in Path(demo_cache).iterdir() if p.suffix == ".parquet")
    assert files and all(re.match(shard["file_pattern"], p.name) for p in files)
    for path in files:
        schema = pq.read_schema(path)
        assert [{"name": f.name, "type": S.type_name(f.type), "nullable": f.nullable} for f in schema] \
            == shard["columns"]
        assert {k.decode(): v.decode() for k, v in schema.metadata.items() if k.startswith(b"bso_cache")} \
            == shard["metadata"]
    manifest = json.loads((Path(demo_cache) / S.MANIFEST_NAME).read_text())
    spec = json.loads((PINNED / "manifest.schema.json").read_text())
    kinds = {"string": str, "integer": int, "object": dict, "array": list}
    for key in spec["required"]:
        prop = spec["properties"][key]
        assert isinstance(manifest[key], kinds[prop["type"]]), key
        for sub in prop.get("required", []):
            assert isinstance(manifest[key][sub], kinds[prop["properties"][sub]["type"]]), (key, sub)
    assert manifest["format"] == spec["properties"]["format"]["const"]
    assert manifest["schema_version"] in spec["properties"]["schema_version"]["enum"]
    assert re.match(spec["properties"]["digest"]["pattern"], manifest["digest"])
