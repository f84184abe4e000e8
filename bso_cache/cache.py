"""The cache on disk: shard writer, manifest, integrity checks and the streaming reader.

Layout (see schemas/): `manifest.json` (written last, atomically) and `part-NNNNN.parquet`.
While a build runs, `build.json` holds the build's identity and each finished shard has a
sidecar `part-NNNNN.json` (rows, checksum, drops); both are folded into the manifest at the end.
Every file is written under a temporary name and renamed into place, so a killed build leaves
only complete shards behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import schemas as S
from .errors import CacheError

ROW_GROUP_ROWS = 512
_SHARD_RE = re.compile(r"^part-\d{5}\.parquet$")


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def shard_name(index: int) -> str:
    return S.SHARD_PATTERN.format(index)


def write_shard(directory: Path, index: int, rows: dict[str, list]) -> dict:
    """Write one shard atomically; returns its manifest entry (file, rows, bytes, sha256)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict(rows, schema=S.shard_schema())
    final = directory / shard_name(index)
    tmp = directory / (final.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                   write_statistics=[S.SOURCE_INDEX])
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return {"file": final.name, "rows": table.num_rows, "bytes": final.stat().st_size,
            "sha256": file_sha256(final)}


def empty_columns() -> dict[str, list]:
    return {name: [] for name in S.COLUMNS}


# --- manifest ------------------------------------------------------------------------------------

def read_manifest(cache_dir: Path) -> dict:
    """Read and check a finished cache's manifest; errors name the file and the field."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"{cache_dir}: no such cache folder")
    path = cache_dir / S.MANIFEST_NAME
    if not path.exists():
        hint = (" (an unfinished build: re-run the same build command to resume it)"
                if (cache_dir / "build.json").exists() else "")
        raise CacheError(f"{path}: missing; this folder is not a finished bso-cache cache{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e}); the manifest is damaged, rebuild the cache") from None
    if not isinstance(manifest, dict) or manifest.get("format") != S.FORMAT_NAME:
        raise CacheError(f"{path}: field 'format' is not '{S.FORMAT_NAME}'; not a bso-cache manifest")
    version = manifest.get("schema_version")
    if version != S.SCHEMA_VERSION:
        raise CacheError(
            f"{path}: field 'schema_version' is {version!r}, this bso-cache reads version "
            f"{S.SCHEMA_VERSION}; rebuild the cache with this version (bso-cache build ... --overwrite) "
            f"or use the bso-cache release that wrote it")
    for key in S.MANIFEST_REQUIRED:
        if key not in manifest:
            raise CacheError(f"{path}: field '{key}' is missing; the manifest is damaged, rebuild the cache")
    for i, shard in enumerate(manifest["shards"]):
        name = shard.get("file") if isinstance(shard, dict) else None
        if not isinstance(name, str) or not _SHARD_RE.match(name):
            raise CacheError(f"{path}: field 'shards[{i}].file' = {name!r} is not a shard name "
                             f"like part-00000.parquet; refusing a path outside the cache")
        for key in ("rows", "sha256"):
            if key not in shard:
                raise CacheError(f"{path}: field 'shards[{i}].{key}' is missing")
    rows = manifest["rows"]
    if rows.get("written", -1) + sum(rows.get("dropped", {}).values()) != rows.get("input"):
        raise CacheError(f"{path}: field 'rows' does not add up (written + dropped != input)")
    return manifest


def check_tokenizer(cache_dir, manifest: dict, tokenizer, name: str) -> None:
    """Refuse a tokenizer other than the one the cache's token ids were made with."""
    from .errors import MismatchError
    from .tokenize import tokenizer_digest

    if tokenizer_digest(tokenizer, None) != manifest["tokenizer"].get("vocab_digest"):
        raise MismatchError(
            f"the tokenizer of {name} ({type(tokenizer).__name__}, {len(tokenizer)} tokens) is not the "
            f"tokenizer the cache {cache_dir} was built with ({manifest['tokenizer'].get('name_or_path')}); "
            f"the cached token ids would mean other text. Use a model that shares the reference's "
            f"tokenizer, or build a cache with this model")


def shard_paths(cache_dir: Path, manifest: dict) -> list[Path]:
    return [Path(cache_dir) / s["file"] for s in manifest["shards"]]


def verify_shards(cache_dir: Path, manifest: dict, *, checksums: bool = True) -> None:
    """Refuse a missing, truncated, damaged or foreign shard, naming it."""
    import pyarrow.parquet as pq

    expected = S.shard_schema()
    for shard, path in zip(manifest["shards"], shard_paths(cache_dir, manifest)):
        if not path.is_file():
            raise CacheError(f"{path}: shard listed in the manifest is missing; rebuild the cache")
        if path.stat().st_size != shard.get("bytes", path.stat().st_size):
            raise CacheError(f"{path}: size {path.stat().st_size} differs from the manifest's "
                             f"{shard['bytes']}; the shard is damaged or foreign, rebuild the cache")
        if checksums and file_sha256(path) != shard["sha256"]:
            raise CacheError(f"{path}: checksum differs from the manifest; the shard is damaged "
                             f"or foreign, rebuild the cache")
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"{path}: not a readable Parquet file ({e}); rebuild the cache") from None
        if meta.num_rows != shard["rows"]:
            raise CacheError(f"{path}: has {meta.num_rows} rows, the manifest says {shard['rows']}")
        missing = [f.name for f in expected if f.name not in schema.names]
        if missing:
            raise CacheError(f"{path}: columns {missing} are missing; not a shard of this schema")


@dataclass
class Cache:
    """A finished cache: its folder and manifest. Use `Cache.open(path)`."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path, *, verify: bool = True) -> "Cache":
        path = Path(path)
        manifest = read_manifest(path)
        if verify:
            verify_shards(path, manifest)
        return cls(path, manifest)

    @property
    def shards(self) -> list[Path]:
        return shard_paths(self.path, self.manifest)

    @property
    def num_pairs(self) -> int:
        return int(self.manifest["rows"]["written"])

    def iter_batches(self, columns: Iterable[str] = S.TRAIN_COLUMNS, *,
                     shard_order: Iterable[int] | None = None,
                     batch_rows: int = ROW_GROUP_ROWS) -> Iterator:
        """Stream pyarrow RecordBatches shard by shard; memory is one row group at a time."""
        import pyarrow.parquet as pq

        columns = list(columns)
        order = range(len(self.shards)) if shard_order is None else shard_order
        for i in order:
            path = self.shards[i]
            try:
                pf = pq.ParquetFile(path)
                yield from pf.iter_batches(batch_size=batch_rows, columns=columns)
            except OSError as e:
                raise CacheError(f"{path}: cannot be read ({e}); run `bso-cache verify {self.path}`") from None

    def read_columns(self, columns: Iterable[str]) -> dict:
        """Small columns (labels, lengths) of the whole cache as numpy arrays."""
        import numpy as np

        columns = list(columns)
        parts: dict[str, list] = {c: [] for c in columns}
        for batch in self.iter_batches(columns):
            for c in columns:
                parts[c].append(batch.column(c).to_numpy(zero_copy_only=False))
        return {c: (np.concatenate(v) if v else np.array([])) for c, v in parts.items()}
