"""Reading a finished cache: `Cache.open` (manifest and shard checks) and the streaming reader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from bso_cache import schemas as S
from bso_cache.errors import CacheError, MismatchError
from bso_cache.hashing import file_sha256
from bso_cache.cache.manifest import Manifest, read_manifest

ROW_GROUP_ROWS = 512  # rows per Parquet row group: the reader's unit of memory


def check_tokenizer(cache_dir, manifest: Manifest, tokenizer, name: str) -> None:
    """Refuse a tokenizer other than the one the cache's token ids were made with."""
    from bso_cache.data.tokenize import tokenizer_digest

    if tokenizer_digest(tokenizer, None) != manifest.vocab_digest:
        raise MismatchError(
            f"the tokenizer of {name} ({type(tokenizer).__name__}, {len(tokenizer)} tokens) is not the "
            f"tokenizer the cache {cache_dir} was built with ({manifest.tokenizer.get('name_or_path')}); "
            f"the cached token ids would mean other text. Use a model that shares the reference's "
            f"tokenizer, or build a cache with this model")


def shard_paths(cache_dir: Path, manifest: Manifest) -> list[Path]:
    """The shards' paths; one that resolves outside the cache folder (a symlink, say) is refused."""
    root = Path(cache_dir).resolve()
    paths = [Path(cache_dir) / s.file for s in manifest.shards]
    for path in paths:
        if not path.resolve().is_relative_to(root):
            raise CacheError(f"{path}: the shard resolves to {path.resolve()}, outside the cache folder; a cache's "
                             f"shards are its own files: copy the cache without links, or rebuild it")
    return paths


def check_digest(cache_dir, manifest: Manifest, expected: str | None) -> None:
    """--expect-digest: the cache its builder published (the digest `bso-cache inspect` prints), or refused."""
    if expected is not None and manifest.digest != expected:
        raise CacheError(f"{cache_dir}: its manifest digest is {manifest.digest}, not the {expected} given with "
                         f"--expect-digest: this is another cache, or one edited since it was published")


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


def verify_shards(cache_dir: Path, manifest: Manifest, *, checksums: bool = True) -> None:
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
    manifest: Manifest

    @classmethod
    def open(cls, path, *, verify: bool = True, expect_digest: str | None = None) -> "Cache":
        path = Path(path)
        manifest = read_manifest(path)
        check_digest(path, manifest, expect_digest)
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
        limits = RowLimits.of(self.manifest)
        for i in order:
            path = self.shards[i]
            try:
                pf = pq.ParquetFile(path)
                row = 0
                for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                    limits.check(batch, path, row)
                    row += batch.num_rows
                    yield batch
            except OSError as e:
                raise CacheError(f"{path}: cannot be read ({e}); run `bso-cache verify --cache {self.path}`") from None


LOGP_SLACK = 1e-4  # a sum of float32 log-softmax values can round a hair above 0, never by this much


@dataclass(frozen=True)
class RowLimits:
    """What every row of a cache must hold, checked as it streams, before it reaches a model: token
    ids in [0, the reference's vocabulary), non-empty responses, prompt + the longer response within
    the manifest's max_length (unless it records truncation), reference log-probs finite and <= 0.
    The checksums catch accidents; these catch values no build writes, whoever edited the shard."""

    vocab: int | None
    max_length: int | None

    @classmethod
    def of(cls, manifest: Manifest) -> "RowLimits":
        vocab = manifest.reference.get("vocab_size")
        tok = manifest.tokenization
        max_length = tok.get("max_length") if tok.get("overlong", "drop") != "truncate" else None
        return cls(vocab if isinstance(vocab, int) else None, max_length if isinstance(max_length, int) else None)

    def check(self, batch, path: Path, first_row: int) -> None:
        import pyarrow.compute as pc

        names = batch.schema.names
        lengths = {}
        for column in (S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS):
            if column not in names:
                continue
            ids = batch.column(column)
            lengths[column] = pc.list_value_length(ids)
            flat = pc.list_flatten(ids)
            if len(flat):
                low, high = pc.min_max(flat).values()
                if low.as_py() < 0 or (self.vocab is not None and high.as_py() >= self.vocab):
                    bad = pc.or_(pc.less(flat, 0), pc.greater_equal(flat, self.vocab or 2 ** 31))
                    self._fail(path, first_row + self._row_of(ids, bad), column,
                               f"holds token id {(low if low.as_py() < 0 else high).as_py()}, outside the "
                               f"reference's vocabulary [0, {self.vocab})")
            if column != S.PROMPT_IDS and pc.any(pc.equal(lengths[column], 0)).as_py():
                self._fail(path, first_row + _first(pc.equal(lengths[column], 0)), column, "is empty (a response "
                           "has at least one token)")
        if self.max_length is not None and len(lengths) == 3:
            total = pc.add(lengths[S.PROMPT_IDS], pc.max_element_wise(lengths[S.CHOSEN_IDS], lengths[S.REJECTED_IDS]))
            over = pc.greater(total, self.max_length)
            if pc.any(over).as_py():
                row = _first(over)
                self._fail(path, first_row + row, S.PROMPT_IDS, f"with the longer response is {total[row].as_py()} "
                           f"tokens, past the manifest's max_length {self.max_length}")
        for column in (S.REF_CHOSEN_LOGP, S.REF_REJECTED_LOGP):
            if column in names:
                values = batch.column(column)
                bad = pc.or_kleene(pc.invert(pc.is_finite(values)), pc.greater(values, LOGP_SLACK))
                if pc.any(bad).as_py():
                    row = _first(bad)
                    self._fail(path, first_row + row, column, f"is {values[row].as_py()}, not a log-probability "
                               f"(finite and <= 0)")

    @staticmethod
    def _row_of(lists, bad_values) -> int:
        import pyarrow.compute as pc

        parents = pc.list_parent_indices(lists)
        return pc.filter(parents, bad_values)[0].as_py()

    @staticmethod
    def _fail(path: Path, row: int, column: str, what: str):
        raise CacheError(f"{path}: row {row}: field '{column}' {what}; the shard was damaged or edited after the "
                         f"build (its checksum can be recomputed by whoever edits it): rebuild the cache, or get it "
                         f"again from its builder")


def _first(mask) -> int:
    import pyarrow.compute as pc

    return pc.index(mask, True).as_py()
