"""The on-disk contracts of a bso-cache cache, defined once.

Installed as `bso_cache.schemas` (see pyproject.toml). Nothing else in the project spells a
column name as a literal: import the constants from here.

A cache is a directory holding Parquet shards `part-00000.parquet`, `part-00001.parquet`, ...
(each row one preference pair) and `.manifest.json` (written last, atomically). The manifest is a
dot file so that folder readers see only the shards: `pyarrow.parquet.read_table(CACHE)`,
`polars.scan_parquet("CACHE/*.parquet")`, `datasets.load_dataset("parquet", data_dir=CACHE)` and
duckdb's `read_parquet('CACHE/*.parquet')` read the cache as it is. Version 1 caches (with
`manifest.json` beside the shards) are still read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2                     # 2: the manifest is `.manifest.json`, with a digest
READ_VERSIONS = (2,)
MANIFEST_NAME = ".manifest.json"
MANIFEST_NAME_V1 = "manifest.json"     # 0.1.0's (schema 1): recognised, to refuse it by name, never read
BUILD_STATE_NAME = "build.json"        # an unfinished build's identity (folded into the manifest at the end)
BUILD_LOCK_NAME = ".build.lock"        # held while a build writes (a dot file: folder readers skip it)
SHARD_PREFIX = "part-"                 # every file a build writes per shard (shard, sidecar, temporaries)
SHARD_PATTERN = SHARD_PREFIX + "{:05d}.parquet"
SHARD_FILE_RE = "^" + SHARD_PREFIX + r"\d{5}\.parquet$"
FORMAT_NAME = "bso-cache"

# --- shard columns (the cache contract: docs/CACHE.md, plus the columns loss variants need) ----------
PAIR_ID = "pair_id"                    # string: stable id of the pair (same input -> same id)
SOURCE_INDEX = "source_index"          # int64: row number in the input (0-based)
PROMPT_IDS = "prompt_ids"              # list<int32>: rendered prompt, exactly as scored
CHOSEN_IDS = "chosen_ids"              # list<int32>: chosen response, exactly as scored
REJECTED_IDS = "rejected_ids"          # list<int32>: rejected response
REF_CHOSEN_LOGP = "ref_chosen_logp"    # float64: sum log pi_ref over chosen_ids given prompt_ids
REF_REJECTED_LOGP = "ref_rejected_logp"
CHOSEN_UNSAFE = "chosen_unsafe"        # bool, nullable: 1 = unsafe, null = no label
REJECTED_UNSAFE = "rejected_unsafe"
SAFER_IS_CHOSEN = "safer_is_chosen"    # bool, nullable: which response the data calls safer
CHOSEN_SEVERITY = "chosen_severity"    # int8, nullable: PKU severity level of the chosen response
REJECTED_SEVERITY = "rejected_severity"
TRUNCATED = "truncated"                # bool: a response was cut to fit --max-length

COLUMNS = (
    PAIR_ID, SOURCE_INDEX, PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS, REF_CHOSEN_LOGP,
    REF_REJECTED_LOGP, CHOSEN_UNSAFE, REJECTED_UNSAFE, SAFER_IS_CHOSEN, CHOSEN_SEVERITY,
    REJECTED_SEVERITY, TRUNCATED,
)

# Columns the trainer reads (everything but the ids of provenance).
TRAIN_COLUMNS = (
    SOURCE_INDEX, PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS, REF_CHOSEN_LOGP, REF_REJECTED_LOGP,
    CHOSEN_UNSAFE, REJECTED_UNSAFE, SAFER_IS_CHOSEN,
)


def shard_schema():
    """The pyarrow schema of a shard (pyarrow imported lazily)."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    return pa.schema(
        [
            pa.field(PAIR_ID, pa.string(), nullable=False),
            pa.field(SOURCE_INDEX, pa.int64(), nullable=False),
            pa.field(PROMPT_IDS, ids, nullable=False),
            pa.field(CHOSEN_IDS, ids, nullable=False),
            pa.field(REJECTED_IDS, ids, nullable=False),
            pa.field(REF_CHOSEN_LOGP, pa.float64(), nullable=False),
            pa.field(REF_REJECTED_LOGP, pa.float64(), nullable=False),
            pa.field(CHOSEN_UNSAFE, pa.bool_(), nullable=True),
            pa.field(REJECTED_UNSAFE, pa.bool_(), nullable=True),
            pa.field(SAFER_IS_CHOSEN, pa.bool_(), nullable=True),
            pa.field(CHOSEN_SEVERITY, pa.int8(), nullable=True),
            pa.field(REJECTED_SEVERITY, pa.int8(), nullable=True),
            pa.field(TRUNCATED, pa.bool_(), nullable=False),
        ],
        metadata={b"bso_cache.schema_version": str(SCHEMA_VERSION).encode()},
    )


# --- what the safety columns mean for a pair ------------------------------------------------
# A pair's type is (chosen safety)/(rejected safety); index 2 * chosen_unsafe + rejected_unsafe,
# and UNLABELLED when either label is null. One taxonomy for the loss diagnostics, evaluation,
# inspect and the plots.
PAIR_TYPES = ("safe/safe", "safe/unsafe", "unsafe/safe", "unsafe/unsafe", "unlabelled")
UNLABELLED = 4


# --- the manifest ------------------------------------------------------------------------------
# `.manifest.json` is JSON; `bso_cache.cache.Manifest.from_json` reads it strictly (every required
# field, of its type) and `to_json` writes it. `MANIFEST_REQUIRED` are its required top-level keys.
MANIFEST_REQUIRED = (
    "format", "schema_version", "created", "bso_cache_version", "reference", "tokenizer",
    "input", "tokenization", "reference_pass", "rows", "shards", "columns",
)
# Settings that must match for a resumed build to continue an unfinished one.
BUILD_IDENTITY_KEYS = ("reference", "tokenizer", "input", "tokenization", "reference_pass", "layout")
# Required fields of the sections the library reads (section -> key -> type).
MANIFEST_SECTION_FIELDS = {
    "reference": {"name_or_path": str, "weights_digest": str},
    "tokenizer": {"vocab_digest": str},
    "reference_pass": {"dtype": str},
    "rows": {"input": int, "written": int, "dropped": dict},
}
MANIFEST_TOP_TYPES = {"format": str, "schema_version": int, "created": str, "bso_cache_version": str,
                      "shards": list, "columns": list}


_JSON_TYPES = {str: "string", int: "integer", dict: "object", list: "array"}


def type_name(t) -> str:
    """An Arrow type as the contract spells it (a list by its values' type: Parquet readers name the
    list's item field differently)."""
    import pyarrow as pa

    return f"list<{type_name(t.value_type)}>" if pa.types.is_list(t) else str(t)


def contract() -> dict[str, dict]:
    """The on-disk contract as documents a test pins (schemas/*.json at the repository's root, as
    safetensors pins its header): the shard's Arrow schema and a JSON Schema of the manifest's
    required fields. A change of either is a change of the cache format."""
    schema = shard_schema()
    shard = {"columns": [{"name": f.name, "type": type_name(f.type), "nullable": f.nullable} for f in schema],
             "metadata": {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()},
             "file_pattern": SHARD_FILE_RE}
    props = {key: {"type": _JSON_TYPES[kind]} for key, kind in MANIFEST_TOP_TYPES.items()}
    props["format"]["const"] = FORMAT_NAME
    props["schema_version"]["enum"] = list(READ_VERSIONS)
    props["digest"] = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}
    for section in MANIFEST_REQUIRED:
        if section in MANIFEST_TOP_TYPES:
            continue
        fields = MANIFEST_SECTION_FIELDS.get(section, {})
        props[section] = {"type": "object", "required": list(fields),
                          "properties": {k: {"type": _JSON_TYPES[t]} for k, t in fields.items()}}
    manifest = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": f"{MANIFEST_NAME} of a cache",
                "type": "object", "required": [*MANIFEST_REQUIRED, "digest"], "properties": props}
    return {"shard.schema.json": shard, "manifest.schema.json": manifest}


def manifest_digest(obj: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), its `digest` field left out:
    any edit of the manifest after the build changes it."""
    import hashlib
    import json

    body = {k: v for k, v in obj.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- run folders (`bso-cache train --out`) ---------------------------------------------------

@dataclass(frozen=True)
class RunLayout:
    """Where a training run writes what: every file name of a run folder, spelled once.

    Besides these, the final model and tokenizer are written by `save_pretrained`; the run lists
    those files in `summary.json` ("files"), so that `--overwrite` removes exactly what a run wrote.
    """

    root: Path

    RUN_CONFIG = "run_config.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    CHECKPOINTS = "checkpoints"
    TENSORBOARD = "tensorboard"
    ADAPTER = "adapter"
    PLOTS = "plots"
    CHECKPOINT_STATE = "state.json"          # inside checkpoints/step-N/
    CHECKPOINT_WEIGHTS = "model.safetensors"
    TRAINER_STATE = "trainer_state.pt"       # optimizer, scheduler, RNG (torch.load with weights_only=True)
    LOCK = ".run.lock"                       # held while a run writes the folder (locks.folder_lock)
    TRACKERS = "trackers.json"               # --report-to: the tracker run ids, so that --resume continues them
    WANDB = "wandb"                          # --report-to wandb: its local files
    SWEEP_STATUS = "sweep_status.json"       # a sweep's run that did not finish: stopped early or failed

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def run_config(self) -> Path:
        return self.root / self.RUN_CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def summary(self) -> Path:
        return self.root / self.SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def tensorboard(self) -> Path:
        return self.root / self.TENSORBOARD

    @property
    def adapter(self) -> Path:
        return self.root / self.ADAPTER

    @property
    def plots(self) -> Path:
        return self.root / self.PLOTS

    @property
    def sweep_status(self) -> Path:
        return self.root / self.SWEEP_STATUS

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:08d}"

    @classmethod
    def own_names(cls) -> frozenset[str]:
        """The entries of a run folder that a run writes under fixed names."""
        return frozenset({cls.RUN_CONFIG, cls.METRICS, cls.SUMMARY, cls.CHECKPOINTS, cls.TENSORBOARD,
                          cls.ADAPTER, cls.PLOTS, cls.RUN_CONFIG + ".tmp", cls.SUMMARY + ".tmp", cls.LOCK,
                          cls.TRACKERS, cls.WANDB, cls.SWEEP_STATUS})


@dataclass(frozen=True)
class SweepLayout:
    """A sweep folder (`bso-cache sweep --out`): one run folder per configuration, and the summary."""

    LOCK = ".sweep.lock"  # held while a sweep runs in the folder (locks.folder_lock)

    root: Path

    SUMMARY_CSV = "summary.csv"
    LOSS_CURVES = "loss_curves.png"
    TRADEOFF = "tradeoff.png"

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def run(self, name: str) -> RunLayout:
        return RunLayout(self.root / name)

    @property
    def summary_csv(self) -> Path:
        return self.root / self.SUMMARY_CSV

    @property
    def summary_json(self) -> Path:
        return self.root / RunLayout.SUMMARY
