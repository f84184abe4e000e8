"""A build's finished shards on disk: each shard's sidecar (its checksum, drops, stats), and the
manifest folded from them once every shard is done (then the sidecars and build.json go)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from . import __version__
from . import schemas as S
from .cache import atomic_write_json, shard_name
from .config import BuildConfig, to_dict
from .dist import Dist
from .errors import CacheError
from .hashing import file_sha256
from .locks import folder_lock


def counts_text(counts: dict[str, int]) -> str:
    """{'overlong': 193, 'bad_label': 2} -> 'overlong 193, bad_label 2' (largest first)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


class EmptyBuild(CacheError):
    """Every input row was dropped: there is no cache to write."""

    HINTS = {"overlong": "raise --max-length or pass --overlong truncate",
             "prompt_too_long": "raise --max-length", }

    def __init__(self, out: Path, n_input: int, dropped: dict[str, int]):
        main = max(dropped, key=dropped.get) if dropped else None
        hint = self.HINTS.get(main, "fix the rows (run without --skip-bad-rows to see the first bad one)")
        super().__init__(f"{out}: no pair was written: all {n_input} input rows were dropped ({counts_text(dropped)}); "
                         f"{hint}")


def sidecar(out: Path, k: int) -> Path:
    return out / shard_name(k).replace(".parquet", ".json")


def sidecar_done(out: Path, k: int) -> dict | None:
    side = sidecar(out, k)
    if not side.exists():
        return None
    try:
        info = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None
    shard = out / info["shard"]["file"]
    if not shard.exists() or file_sha256(shard) != info["shard"]["sha256"]:
        return None
    return info


def write_manifest(out: Path, identity: dict, cfg: BuildConfig, n_input: int, n_blocks: int,
                    ref_info: dict | None, input_notes: dict[str, int] | None = None) -> S.Manifest:
    sides = []
    for k in range(n_blocks):
        info = sidecar_done(out, k)
        if info is None:
            raise CacheError(f"{sidecar(out, k)}: shard {k} is not finished; re-run the build to resume")
        sides.append(info)
    dropped: dict[str, int] = {}
    notes: dict[str, int] = dict(input_notes or {})  # what the pass over the whole input found
    for info in sides:
        for reason, n in info["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
        for key, n in info.get("notes", {}).items():
            notes[key] = notes.get(key, 0) + n
    written = sum(info["shard"]["rows"] for info in sides)
    if written == 0:
        raise EmptyBuild(out, n_input, dropped)
    if written + sum(dropped.values()) != n_input:
        raise CacheError(f"{out}: accounting failed: {written} written + {sum(dropped.values())} "
                         f"dropped != {n_input} input rows; rebuild with --overwrite")
    seconds = sum(i["stats"]["seconds"] for i in sides)
    tokens = sum(i["stats"]["tokens"] for i in sides)
    padded = sum(i["stats"]["padded_tokens"] for i in sides)
    reference = dict(identity["reference"])
    if ref_info:
        reference.update(ref_info)
    else:  # every shard was already done (a resume after the last shard): read the sidecars' copy
        reference.update(next((i["reference"] for i in sides if i.get("reference")), {}))
    manifest = {
        "format": S.FORMAT_NAME,
        "schema_version": S.SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bso_cache_version": __version__,
        **identity,
        "reference": reference,
        "rows": {"input": n_input, "written": written, "dropped": dict(sorted(dropped.items()))},
        "notes": notes,
        "columns": list(S.COLUMNS),
        "shards": [{**i["shard"], "input_rows": i["input_rows"]} for i in sides],
        "stats": {"score_seconds": round(seconds, 3),
                  "pairs_per_s": round(written / seconds, 2) if seconds else None,
                  "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
                  "tokens": tokens, "padding_share": round(1 - tokens / padded, 4) if padded else 0.0,
                  "batch_size": cfg.batch_size, "prefix_sharing": _sharing_summary(sides)},
        "build_config": to_dict(cfg),
    }
    manifest["digest"] = S.manifest_digest(manifest)
    manifest = S.Manifest.from_json(manifest)  # the contract, checked before it is written
    atomic_write_json(out / S.MANIFEST_NAME, manifest.to_json())
    for k in range(n_blocks):
        sidecar(out, k).unlink(missing_ok=True)
    (out / S.BUILD_STATE_NAME).unlink(missing_ok=True)
    return manifest


def _sharing_summary(sides: list[dict]):
    """true / false when every shard was scored the same way, "mixed" when a resume changed it."""
    used = {i["stats"].get("prefix_sharing") for i in sides if i["shard"]["rows"]}
    return used.pop() if len(used) == 1 else ("mixed" if used else None)


def build_lock(out: Path, take: bool):
    """One build at a time into a folder (OUT/.build.lock; `locks.folder_lock`)."""
    return folder_lock(out, S.BUILD_LOCK_NAME, take=take, refuse=lambda holder: CacheError(
        f"{out}: another build is writing this cache ({holder}); wait for it to finish, or choose another --out"))


def remove_build_files(out: Path) -> None:
    """Remove a build's shards, sidecars and state (the user's other files stay)."""
    for p in out.iterdir():
        if p.name.startswith("part-") or p.name in (S.BUILD_STATE_NAME, S.BUILD_STATE_NAME + ".tmp"):
            p.unlink()
    if not [p for p in out.iterdir() if p.name != S.BUILD_LOCK_NAME]:
        shutil.rmtree(out, ignore_errors=True)


def release_memory() -> None:
    """Between shards: hand the freed memory of the shard just written back to the system (the
    Arrow pool's and the C heap's), so the build's footprint does not creep up with the shards."""
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def read_state(out: Path) -> dict:
    try:
        return json.loads((out / S.BUILD_STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def write_state(out: Path, identity: dict, dist: Dist) -> None:
    """Record the build's identity (after the input was validated, so a bad row leaves nothing),
    keeping the prefix-sharing decision of the run it resumes."""
    if dist.is_main:
        atomic_write_json(out / S.BUILD_STATE_NAME, {"format": S.FORMAT_NAME, "schema_version": S.SCHEMA_VERSION,
                                              **identity, "prefix_sharing": read_state(out).get("prefix_sharing")})
    dist.barrier()


def record_sharing(out: Path, sharing: bool | None) -> None:
    """Keep the first shard's decision, so that a resumed build scores its shards the same way
    (even when auto or the model would decide otherwise on a later shard): bit-identical shards."""
    state = read_state(out)
    if sharing is not None and state and state.get("prefix_sharing") is None:
        atomic_write_json(out / S.BUILD_STATE_NAME, {**state, "prefix_sharing": sharing})


# A build that drops more than this share of its input says so, with the main reason and its fix.
DROP_WARNING_SHARE = 0.2
_DROP_FIXES = {"overlong": "a larger --max-length, or --overlong truncate",
               "prompt_too_long": "a larger --max-length (the prompt alone does not fit)",
               "missing_field": "--format naming the data's layout (README, \"Input formats\")",
               "template_boundary": "--template plain, or a --chat-template that renders prompts as prefixes",
               "template_error": "--template plain, or a --chat-template that accepts these messages",
               "invalid_json": "fixing the file (--skip-bad-rows counted these)"}


def drop_warning(dropped: dict[str, int], n_input: int, max_length: int) -> str | None:
    """A line when most of the input was dropped: the main reason and what changes it."""
    total = sum(dropped.values())
    if not n_input or total <= DROP_WARNING_SHARE * n_input:
        return None
    reason, n = max(dropped.items(), key=lambda kv: kv[1])
    fix = _DROP_FIXES.get(reason)
    return (f"warning: {total} of {n_input} input rows ({100 * total / n_input:.1f}%) were dropped, most as "
            f"{reason} ({n}){f' (at --max-length {max_length})' if reason in ('overlong', 'prompt_too_long') else ''}"
            f"{f'; try {fix}' if fix else ''}; the manifest lists every reason")
