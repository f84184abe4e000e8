"""A cache's manifest in one place: its type (`Manifest`, checked field by field against the contract
in bso_cache/schemas.py), how it is composed from a build's finished shards, and how it is read.

The file is written only by `bso_cache.cache.writer`, once every shard is done, atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from bso_cache import __version__
from bso_cache import schemas as S
from bso_cache.errors import CacheError, ManifestError


def counts_text(counts: dict[str, int]) -> str:
    """{'overlong': 193, 'bad_label': 2} -> 'overlong 193, bad_label 2' (largest first)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


def _field(obj: dict, key: str, kind, where: str):
    if key not in obj:
        raise ManifestError(f"field '{where}{key}' is missing")
    value = obj[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ManifestError(f"field '{where}{key}' is {type(value).__name__}, expected {kind.__name__}")
    return value


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a cache as the manifest lists it."""

    file: str
    rows: int
    bytes: int
    sha256: str
    input_rows: tuple[int, int]

    @classmethod
    def from_json(cls, obj, where: str = "shards[0].") -> "ShardInfo":
        import re

        if not isinstance(obj, dict):
            raise ManifestError(f"field '{where.rstrip('.')}' is not an object")
        name = obj.get("file")
        if not isinstance(name, str) or not re.match(S.SHARD_FILE_RE, name):
            raise ManifestError(f"field '{where}file' = {name!r} is not a shard name like part-00000.parquet; "
                                f"refusing a path outside the cache")
        span = _field(obj, "input_rows", list, where)
        if len(span) != 2 or not all(isinstance(x, int) for x in span):
            raise ManifestError(f"field '{where}input_rows' is not [first, end]")
        return cls(name, _field(obj, "rows", int, where), _field(obj, "bytes", int, where),
                   _field(obj, "sha256", str, where), (span[0], span[1]))

    def to_json(self) -> dict:
        return {"file": self.file, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256,
                "input_rows": list(self.input_rows)}


@dataclass(frozen=True)
class Manifest:
    """A finished cache's manifest: what makes its numbers what they are, and its shards.

    The sections (`reference`, `tokenizer`, `input`, `tokenization`, `reference_pass`, `rows`,
    `stats`, ...) are kept as the JSON objects they are; the fields the library relies on are
    checked by `from_json` and exposed as properties.
    """

    format: str
    schema_version: int
    created: str
    bso_cache_version: str
    reference: dict
    tokenizer: dict
    input: dict
    tokenization: dict
    reference_pass: dict
    rows: dict
    shards: tuple[ShardInfo, ...]
    columns: tuple[str, ...]
    notes: dict
    stats: dict
    layout: dict
    build_config: dict
    digest: str | None = None

    @classmethod
    def from_json(cls, obj) -> "Manifest":
        """Strict: raises ManifestError naming the first field that is missing or of the wrong type."""
        if not isinstance(obj, dict) or obj.get("format") != S.FORMAT_NAME:
            raise ManifestError(f"field 'format' is not '{S.FORMAT_NAME}'; not a bso-cache manifest")
        version = obj.get("schema_version")
        if version not in S.READ_VERSIONS:
            raise ManifestError(f"field 'schema_version' is {version!r}, this bso-cache reads versions "
                                f"{', '.join(map(str, S.READ_VERSIONS))}")
        for key in S.MANIFEST_REQUIRED:
            _field(obj, key, S.MANIFEST_TOP_TYPES.get(key, dict), "")
        for section, fields in S.MANIFEST_SECTION_FIELDS.items():
            for key, kind in fields.items():
                _field(obj[section], key, kind, f"{section}.")
        shards = tuple(ShardInfo.from_json(sh, f"shards[{i}].") for i, sh in enumerate(obj["shards"]))
        rows = obj["rows"]
        if rows["written"] + sum(rows["dropped"].values()) != rows["input"]:
            raise ManifestError("field 'rows' does not add up (written + dropped != input)")
        if sum(sh.rows for sh in shards) != rows["written"]:
            raise ManifestError("field 'shards' does not add up to rows.written")
        optional = {k: obj.get(k) or {} for k in ("notes", "stats", "layout", "build_config")}
        for key, value in optional.items():
            if not isinstance(value, dict):
                raise ManifestError(f"field '{key}' is {type(value).__name__}, expected dict")
        digest = obj.get("digest")
        if digest is None:
            raise ManifestError("field 'digest' is missing (the manifest was edited, or not written by bso-cache)")
        if digest is not None and digest != S.manifest_digest(obj):
            raise ManifestError("was edited after the build: its digest does not match its content (field "
                                "'digest'); restore the manifest the build wrote, or rebuild the cache")
        optional["digest"] = digest
        return cls(obj["format"], version, obj["created"], obj["bso_cache_version"], obj["reference"],
                   obj["tokenizer"], obj["input"], obj["tokenization"], obj["reference_pass"], rows, shards,
                   tuple(obj["columns"]), **optional)

    def to_json(self) -> dict:
        return {"format": self.format, "schema_version": self.schema_version, "created": self.created,
                "bso_cache_version": self.bso_cache_version, "reference": self.reference,
                "tokenizer": self.tokenizer, "input": self.input, "tokenization": self.tokenization,
                "reference_pass": self.reference_pass, "layout": self.layout, "rows": self.rows,
                "notes": self.notes, "columns": list(self.columns), "shards": [s.to_json() for s in self.shards],
                "stats": self.stats, "build_config": self.build_config,
                **({"digest": self.digest} if self.digest is not None else {})}

    @property
    def written(self) -> int:
        return self.rows["written"]

    @property
    def reference_name(self) -> str:
        return self.reference["name_or_path"]

    @property
    def reference_gguf(self) -> str | None:
        return self.reference.get("gguf_file")

    @property
    def weights_digest(self) -> str:
        return self.reference["weights_digest"]

    @property
    def reference_dtype(self) -> str:
        return self.reference_pass["dtype"]

    @property
    def reference_quantization(self) -> str | None:
        """"nf4" for a cache scored by the 4-bit reference of a QLoRA run (quantize.py), else None."""
        return self.reference_pass.get("quantization")

    @property
    def vocab_digest(self) -> str:
        return self.tokenizer["vocab_digest"]




# --- reading -------------------------------------------------------------------------------------

def manifest_path(cache_dir: Path) -> Path:
    """The manifest of a cache: `.manifest.json`."""
    return Path(cache_dir) / S.MANIFEST_NAME


def read_manifest(cache_dir: Path) -> Manifest:
    """Read and check a finished cache's manifest; errors name the file and the field."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"{cache_dir}: no such cache folder")
    path = manifest_path(cache_dir)
    if not path.exists():
        hint = (" (an unfinished build: re-run the same build command to resume it)"
                if (cache_dir / S.BUILD_STATE_NAME).exists() else
                f" ({S.MANIFEST_NAME_V1} is a cache of bso-cache 0.1.0, which this version does not read: rebuild "
                f"it with this version)" if (cache_dir / S.MANIFEST_NAME_V1).exists() else "")
        raise CacheError(f"{path}: missing; this folder is not a finished bso-cache cache{hint}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: not valid JSON ({e}); the manifest is damaged, rebuild the cache") from None
    try:
        return Manifest.from_json(obj)
    except ManifestError as e:
        if "schema_version" in str(e) and isinstance(obj, dict) and obj.get("format") == S.FORMAT_NAME:
            raise CacheError(f"{path}: {e}; rebuild the cache with this version (bso-cache build ... --overwrite) "
                             f"or use the bso-cache release that wrote it") from None
        raise CacheError(f"{path}: {e}; the manifest is damaged or not a bso-cache manifest, rebuild the "
                         f"cache") from None


# --- composing (from a build's finished shards) --------------------------------------------------

def compose(out: Path, identity: dict, build_config: dict, n_input: int, sides: list[dict],
            ref_info: dict | None, input_notes: dict[str, int], batch_size: int) -> dict:
    """The manifest of a build whose shards are all done, from their sidecars (`sides`, in shard
    order): rows and drops summed, notes added, the reference as the build learnt it. Raises
    CacheError when the rows do not add up to the input."""
    dropped: dict[str, int] = {}
    notes: dict[str, int] = dict(input_notes)  # what the pass over the whole input found
    for info in sides:
        for reason, n in info["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
        for key, n in info.get("notes", {}).items():
            notes[key] = notes.get(key, 0) + n
    written = sum(info["shard"]["rows"] for info in sides)
    if written + sum(dropped.values()) != n_input:
        raise CacheError(f"{out}: accounting failed: {written} written + {sum(dropped.values())} dropped != {n_input} "
                         f"input rows; rebuild with --overwrite")
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
        "stats": _stats(sides, written, batch_size),
        "build_config": build_config,
    }
    manifest["digest"] = S.manifest_digest(manifest)
    return manifest


def _stats(sides: list[dict], written: int, batch_size: int) -> dict:
    seconds = sum(i["stats"]["seconds"] for i in sides)
    tokens = sum(i["stats"]["tokens"] for i in sides)
    padded = sum(i["stats"]["padded_tokens"] for i in sides)
    used = {i["stats"].get("prefix_sharing") for i in sides if i["shard"]["rows"]}
    return {"score_seconds": round(seconds, 3),
            "pairs_per_s": round(written / seconds, 2) if seconds else None,
            "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
            "tokens": tokens, "padding_share": round(1 - tokens / padded, 4) if padded else 0.0,
            "batch_size": batch_size,
            # true / false when every shard was scored the same way, "mixed" when a resume changed it
            "prefix_sharing": used.pop() if len(used) == 1 else ("mixed" if used else None)}
