"""The cache on disk: shard writer, manifest, integrity checks and the streaming reader.

Layout (see schemas/): `.manifest.json` (written last, atomically; `manifest.json` in a
version-1 cache) and `part-NNNNN.parquet`.
While a build runs, `build.json` holds the build's identity and each finished shard has a
sidecar `part-NNNNN.json` (rows, checksum, drops); both are folded into the manifest at the end.
Every file is written under a temporary name and renamed into place, so a killed build leaves
only complete shards behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from . import schemas as S
from .errors import CacheError, ConfigError
from .hashing import file_sha256

ROW_GROUP_ROWS = 512


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"{path}: cannot be written ({e.strerror}); free space or fix the permissions, then "
                         f"run the same command again") from None


def follow_umask(paths) -> None:
    """Give files the mode the process's umask gives any new file (safetensors writes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in paths:
        if Path(path).is_file():
            os.chmod(path, 0o666 & ~mask)


def strict_json(obj):
    """`obj` with every NaN / infinity replaced by None, so that json.dumps writes strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def to_json(obj, **kwargs) -> str:
    """Strict JSON (null, never NaN) of a result or record."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def require_writable(path: Path, option: str, *, file: bool = False) -> None:
    """Refuse, before any work, an output folder (or `file`'s folder) that cannot be created or
    written: make the missing folders and a probe file, then remove what the probe made."""
    path = Path(path)
    folder = path.parent if file else path
    made = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
    try:
        for attempt in range(5):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
                break
            except FileNotFoundError:  # another torchrun rank's probe removed the folder it had made
                if attempt == 4:
                    raise
        os.close(fd)
        os.unlink(probe)
        if file and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "not writable", str(path))
    except OSError as e:
        raise ConfigError(f"{option} {path}: cannot be written ({e.strerror or e}); choose a writable place, or fix "
                          f"the permissions or the mount") from None
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def shard_name(index: int) -> str:
    return S.SHARD_PATTERN.format(index)


def write_shard(directory: Path, index: int, rows: dict[str, list]) -> dict:
    """Write one shard atomically; returns its manifest entry (file, rows, bytes, sha256)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pydict(rows, schema=S.shard_schema())
    final = directory / shard_name(index)
    tmp = directory / (final.name + ".tmp")
    try:
        pq.write_table(table, tmp, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                       write_statistics=[S.SOURCE_INDEX])
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:  # a full disk, a read-only folder: nothing half-written is left
        tmp.unlink(missing_ok=True)
        raise CacheError(f"{final}: cannot be written ({e.strerror or e}); free space or fix the permissions, "
                         f"then run the same command again to resume") from None
    return {"file": final.name, "rows": table.num_rows, "bytes": final.stat().st_size,
            "sha256": file_sha256(final)}


def empty_columns() -> dict[str, list]:
    return {name: [] for name in S.COLUMNS}


# --- manifest ------------------------------------------------------------------------------------

def manifest_path(cache_dir: Path) -> Path:
    """The manifest of a cache: `.manifest.json`, or `manifest.json` in a version-1 cache."""
    cache_dir = Path(cache_dir)
    v1 = cache_dir / S.MANIFEST_NAME_V1
    return v1 if v1.exists() and not (cache_dir / S.MANIFEST_NAME).exists() else cache_dir / S.MANIFEST_NAME


def enclosing(path: Path, what: str, *, itself: bool = True) -> Path | None:
    """The nearest folder at or above `path` (above only, unless `itself`) that is a cache (a
    manifest or an unfinished build's state) or a training run (its run_config.json), or None."""
    markers = {"cache": (S.MANIFEST_NAME, S.MANIFEST_NAME_V1, S.BUILD_STATE_NAME), "run": (S.RunLayout.RUN_CONFIG,)}
    path = Path(path).resolve()
    for folder in ([path] if itself else []) + list(path.parents):
        if any((folder / m).is_file() for m in markers[what]):
            return folder
    return None


def refuse_nesting(out: Path, option: str, kind: str) -> None:
    """A cache and a run never live inside one another: a run folder inside a cache breaks the readers
    of the cache's folder (pyarrow.parquet.read_table), and --overwrite of one would reach into the other."""
    cache = enclosing(out, "cache", itself=kind != "cache")
    run = enclosing(out, "run", itself=kind != "run")
    for found, what in ((cache, "cache"), (run, "training run")):
        if found is not None:
            raise ConfigError(f"{option} {out} is inside the {what} {found}; a {kind} there would mix with its files: "
                              f"choose a folder outside it")


def check_out(out: Path, kind: str) -> None:
    """An output folder (`--out`) of a cache, run or sweep: not nested in the other kind, writable."""
    refuse_nesting(out, "--out", kind)
    require_writable(out, "--out")


def other_reference(what: str, reference: str, start: str) -> str:
    """The refusal of rewards measured against another reference than the one a model started from."""
    return (f"{what} was built with the reference {reference}, but the model started from {start}: the implicit "
            f"rewards (log pi - log pi_ref) against that reference are not the ones it was trained on. Use a cache "
            f"built with the model it started from, or pass --allow-other-reference to report them relative to "
            f"{reference}")


def read_manifest(cache_dir: Path) -> S.Manifest:
    """Read and check a finished cache's manifest; errors name the file and the field."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"{cache_dir}: no such cache folder")
    path = manifest_path(cache_dir)
    if not path.exists():
        hint = (" (an unfinished build: re-run the same build command to resume it)"
                if (cache_dir / S.BUILD_STATE_NAME).exists() else "")
        raise CacheError(f"{path}: missing; this folder is not a finished bso-cache cache{hint}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e}); the manifest is damaged, rebuild the cache") from None
    try:
        return S.Manifest.from_json(obj)
    except S.ManifestError as e:
        if "schema_version" in str(e) and isinstance(obj, dict) and obj.get("format") == S.FORMAT_NAME:
            raise CacheError(f"{path}: {e}; rebuild the cache with this version (bso-cache build ... --overwrite) "
                             f"or use the bso-cache release that wrote it") from None
        raise CacheError(f"{path}: {e}; the manifest is damaged or not a bso-cache manifest, rebuild the "
                         f"cache") from None


def check_tokenizer(cache_dir, manifest: S.Manifest, tokenizer, name: str) -> None:
    """Refuse a tokenizer other than the one the cache's token ids were made with."""
    from .errors import MismatchError
    from .tokenize import tokenizer_digest

    if tokenizer_digest(tokenizer, None) != manifest.vocab_digest:
        raise MismatchError(
            f"the tokenizer of {name} ({type(tokenizer).__name__}, {len(tokenizer)} tokens) is not the "
            f"tokenizer the cache {cache_dir} was built with ({manifest.tokenizer.get('name_or_path')}); "
            f"the cached token ids would mean other text. Use a model that shares the reference's "
            f"tokenizer, or build a cache with this model")


def shard_paths(cache_dir: Path, manifest: S.Manifest) -> list[Path]:
    return [Path(cache_dir) / s.file for s in manifest.shards]


def _schema_difference(schema, expected) -> str | None:
    """What differs between a shard's Arrow schema and the contract (names, order, types, nullability)."""
    got = [(f.name, f.type, f.nullable) for f in schema]
    want = [(f.name, f.type, f.nullable) for f in expected]
    if got == want:
        return None
    missing = [n for n, _, _ in want if n not in schema.names]
    if missing:
        return f"columns {missing} are missing"
    for (gn, gt, gnull), (wn, wt, wnull) in zip(got, want):
        if gn != wn:
            return f"column {gn!r} stands where {wn!r} should"
        if gt != wt:
            return f"column {gn!r} is {gt}, the contract says {wt}"
        if gnull != wnull:
            return f"column {gn!r} is {'nullable' if gnull else 'not nullable'}, the contract says the opposite"
    return f"extra columns {[n for n, _, _ in got[len(want):]]}"


def verify_shards(cache_dir: Path, manifest: S.Manifest, *, checksums: bool = True) -> None:
    """Refuse a missing, truncated, damaged or foreign shard, naming it."""
    import pyarrow.parquet as pq

    expected = S.shard_schema()
    for shard, path in zip(manifest.shards, shard_paths(cache_dir, manifest)):
        if not path.is_file():
            raise CacheError(f"{path}: shard listed in the manifest is missing; rebuild the cache")
        if path.stat().st_size != shard.bytes:
            raise CacheError(f"{path}: size {path.stat().st_size} differs from the manifest's "
                             f"{shard.bytes}; the shard is damaged or foreign, rebuild the cache")
        if checksums and file_sha256(path) != shard.sha256:
            raise CacheError(f"{path}: checksum differs from the manifest; the shard is damaged "
                             f"or foreign, rebuild the cache")
        try:
            meta = pq.read_metadata(path)
            schema = meta.schema.to_arrow_schema()
        except Exception as e:  # noqa: BLE001
            raise CacheError(f"{path}: not a readable Parquet file ({e}); rebuild the cache") from None
        if meta.num_rows != shard.rows:
            raise CacheError(f"{path}: has {meta.num_rows} rows, the manifest says {shard.rows}")
        problem = _schema_difference(schema, expected)
        if problem:
            raise CacheError(f"{path}: {problem}; not a shard of this schema (version {S.SCHEMA_VERSION}), "
                             f"rebuild the cache")


@dataclass
class Cache:
    """A finished cache: its folder and manifest. Use `Cache.open(path)`."""

    path: Path
    manifest: S.Manifest

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
        return self.manifest.written

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
