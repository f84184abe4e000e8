"""The one writer of a cache folder: `CacheWriter`.

Everything a build puts on disk goes through it: the lock (one build per folder), the check of
what the folder holds (another build's cache, a user's files, an unfinished build to resume), what
`--overwrite` removes, the build's state (`build.json`: its identity), each shard and its sidecar (`part-NNNNN.json`: rows, checksum, drops, notes, timing),
and, once every shard is done, the manifest folded from the sidecars (then the sidecars and the
state go). Every file is written under a temporary name and renamed into place, so a killed build
leaves only complete shards behind, and the same command resumes it.

Shard k holds the pairs of input rows [k * R, (k + 1) * R): the split of the work is fixed by the
input alone, and torchrun ranks write the shards k with k % world == rank; rank 0 folds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

from bso_cache import schemas as S
from bso_cache.io.dist import Dist
from bso_cache.errors import CacheError
from bso_cache.io.files import atomic_write_json
from bso_cache.hashing import file_sha256
from bso_cache.io.locks import folder_lock
from bso_cache.cache.manifest import Manifest, compose, counts_text, manifest_path, read_manifest
from bso_cache.cache.reader import ROW_GROUP_ROWS

# How the inputs were spelled, not what they are (their digests are compared): a build resumes
# whether --model / --data are given relative, absolute or from another working directory.
_SPELLING = {"input.spec", "input.files", "reference.name_or_path", "tokenizer.name_or_path"}


class EmptyBuild(CacheError):
    """Every input row was dropped: there is no cache to write."""

    HINTS = {"overlong": "raise --max-length or pass --overlong truncate",
             "prompt_too_long": "raise --max-length", }

    def __init__(self, out: Path, n_input: int, dropped: dict[str, int]):
        main = max(dropped, key=dropped.get) if dropped else None
        hint = self.HINTS.get(main, "fix the rows (run without --skip-bad-rows to see the first bad one)")
        super().__init__(f"{out}: no pair was written: all {n_input} input rows were dropped ({counts_text(dropped)}); "
                         f"{hint}")


def shard_name(index: int) -> str:
    return S.SHARD_PATTERN.format(index)


def empty_columns() -> dict[str, list]:
    return {name: [] for name in S.COLUMNS}


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


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys of the identity `b` whose values differ in the recorded `a` (extra keys of `a` are
    what the build learnt later, like the model's parameter count, and do not count)."""
    out = []
    for key in sorted(b):
        if f"{prefix}{key}" in _SPELLING:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def _own(name: str) -> bool:
    """Whether a build wrote the file `name` (what --overwrite may remove; anything else is the user's)."""
    return name.startswith(S.SHARD_PREFIX) or name in (
        S.BUILD_STATE_NAME, S.MANIFEST_NAME, S.MANIFEST_NAME_V1, S.BUILD_STATE_NAME + ".tmp",
        S.MANIFEST_NAME + ".tmp")


class CacheWriter:
    """Writes one cache folder, as a context: `with CacheWriter(out, identity, ...) as w:` takes the
    lock and prepares the folder; `w.complete` is the manifest when this exact build is already
    done; otherwise `w.done(k)`, `w.write(k, ...)` per shard and `w.finish(...)` on rank 0."""

    def __init__(self, out: Path, identity: dict, *, overwrite: bool = False, dist: Dist | None = None):
        self.out = Path(out)
        self.identity = identity
        self.overwrite = overwrite
        self.dist = dist or Dist()  # one process unless told
        self.complete: Manifest | None = None
        self._finished: dict[int, dict] = {}  # shard -> its sidecar, checked once per build
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "CacheWriter":
        self.out.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(folder_lock(self.out, S.BUILD_LOCK_NAME, take=self.dist.is_main, refuse=lambda h: (
            CacheError(f"{self.out}: another build is writing this cache ({h}); wait for it to finish, or "
                       f"choose another --out"))))
        try:
            self.complete = self._prepare()
            if self.complete is None:
                self._write_state()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # --- the folder before the build -----------------------------------------------------------

    def _stray(self) -> list[str]:
        return [p.name for p in self.out.iterdir() if not _own(p.name) and p.name != S.BUILD_LOCK_NAME]

    def _prepare(self) -> Manifest | None:
        """Overwrite or check what the folder holds; the finished manifest when this exact build is done."""
        out, dist = self.out, self.dist
        manifest_file, state_path = manifest_path(out), out / S.BUILD_STATE_NAME  # a version-1 cache's too
        if dist.is_main and self.overwrite:
            if self._stray():  # checked before anything is removed
                raise CacheError(f"{out} holds {self._stray()[0]}, which no build wrote; --overwrite removes only "
                                 f"a cache's own files, so nothing was removed: move it away, or choose another --out")
            for p in out.iterdir():
                if _own(p.name):
                    p.unlink()
            manifest_file = out / S.MANIFEST_NAME
        dist.barrier()
        for path, what in ((manifest_file, "a finished cache"), (state_path, "an unfinished build")):
            if path.exists():
                try:
                    previous = json.loads(path.read_text())
                    previous = {k: previous.get(k) for k in S.BUILD_IDENTITY_KEYS}
                except json.JSONDecodeError:
                    previous = {}
                diff = _differences(previous, self.identity)
                nothing_done = path == state_path and not any(out.glob(S.SHARD_PREFIX + "*.json"))
                if diff and not nothing_done:
                    raise CacheError(f"{out} holds {what} made with other settings (differs in: "
                                     f"{', '.join(diff[:6])}); pass --overwrite to start again, or another --out")
                if path == manifest_file:
                    return read_manifest(out)
        if self._stray() and not state_path.exists():
            raise CacheError(f"{out} is not empty and is not a bso-cache cache (found {self._stray()[0]}); "
                             f"choose an empty or new --out")
        dist.barrier()  # every rank has looked before rank 0 writes build.json
        return None

    def _state(self) -> dict:
        try:
            return json.loads((self.out / S.BUILD_STATE_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _write_state(self) -> None:
        """Record the build's identity (what a resumed build must share with it)."""
        if self.dist.is_main:
            atomic_write_json(self.out / S.BUILD_STATE_NAME, {
                "format": S.FORMAT_NAME, "schema_version": S.SCHEMA_VERSION, **self.identity})
        self.dist.barrier()

    # --- shards -----------------------------------------------------------------------------------

    def _sidecar(self, k: int) -> Path:
        return self.out / shard_name(k).replace(".parquet", ".json")

    def done(self, k: int) -> bool:
        """Whether shard k is finished: its sidecar exists and its shard has the recorded checksum."""
        if k in self._finished:
            return True
        try:
            info = json.loads(self._sidecar(k).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        shard = self.out / info["shard"]["file"]
        if not shard.exists() or file_sha256(shard) != info["shard"]["sha256"]:
            return False
        self._finished[k] = info
        return True

    def write(self, k: int, columns: dict[str, list], *, input_rows: tuple[int, int], dropped: dict[str, int],
              notes: dict[str, int], reference: dict | None, stats: dict, started: float) -> None:
        """Shard k and then its sidecar (the sidecar marks it finished); `started`: when its scoring
        began (time.perf_counter), so that the recorded seconds include the write."""
        shard = write_shard(self.out, k, columns)
        info = {"shard": shard, "input_rows": list(input_rows), "dropped": dropped, "notes": notes,
                "reference": reference, "stats": {"seconds": time.perf_counter() - started, **stats}}
        atomic_write_json(self._sidecar(k), info)
        self._finished[k] = info

    # --- the end ----------------------------------------------------------------------------------

    def finish(self, n_shards: int, n_input: int, *, build_config: dict, ref_info: dict | None,
               input_notes: dict[str, int], batch_size: int) -> Manifest:
        """Rank 0: fold every shard's sidecar into the manifest, write it, remove the build's scaffolding.
        A build that wrote no pair leaves nothing behind (an empty result is not a cache)."""
        sides = []
        for k in range(n_shards):
            if not self.done(k):
                raise CacheError(f"{self._sidecar(k)}: shard {k} is not finished; re-run the build to resume")
            sides.append(self._finished[k])
        if not sum(info["shard"]["rows"] for info in sides):
            dropped: dict[str, int] = {}
            for info in sides:
                for reason, n in info["dropped"].items():
                    dropped[reason] = dropped.get(reason, 0) + n
            self._remove()
            raise EmptyBuild(self.out, n_input, dropped)
        manifest = Manifest.from_json(compose(self.out, self.identity, build_config, n_input, sides, ref_info,
                                              input_notes, batch_size))  # the contract, checked before it is written
        atomic_write_json(self.out / S.MANIFEST_NAME, manifest.to_json())
        for k in range(n_shards):
            self._sidecar(k).unlink(missing_ok=True)
        (self.out / S.BUILD_STATE_NAME).unlink(missing_ok=True)
        return manifest

    def _remove(self) -> None:
        """Remove the build's own files (the user's stay); the folder too when nothing else is left."""
        for p in self.out.iterdir():
            if _own(p.name):
                p.unlink()
        if not [p for p in self.out.iterdir() if p.name != S.BUILD_LOCK_NAME]:
            shutil.rmtree(self.out, ignore_errors=True)
