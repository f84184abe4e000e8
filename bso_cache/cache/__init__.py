"""The cache on disk, in one storage layer: its manifest (`manifest.py`: the type, composed and
read), its reader (`reader.py`: `Cache`, shard checks, streaming) and its one writer
(`writer.py`: `CacheWriter`). The contract (file and column names, the shard schema) is in bso_cache/schemas.py; a
build (`build.py`), `verify` and `inspect` are the commands that write and read it.
"""

from bso_cache.cache.manifest import Manifest, ShardInfo, counts_text, manifest_path, read_manifest
from bso_cache.cache.reader import ROW_GROUP_ROWS, Cache, check_digest, check_tokenizer, shard_paths, verify_shards
from bso_cache.cache.writer import CacheWriter, EmptyBuild, empty_columns, write_shard

__all__ = ["Cache", "CacheWriter", "check_digest", "EmptyBuild", "Manifest", "ROW_GROUP_ROWS", "ShardInfo", "check_tokenizer",
           "counts_text", "empty_columns", "manifest_path", "read_manifest", "shard_paths", "verify_shards",
           "write_shard"]
