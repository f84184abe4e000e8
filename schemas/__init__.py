"""The on-disk contracts of a bso-cache cache, defined once.

Installed as `bso_cache.schemas` (see pyproject.toml). Nothing else in the project spells a
column name as a literal: import the constants from here.

A cache is a directory holding `manifest.json` (written last, atomically) and Parquet shards
`part-00000.parquet`, `part-00001.parquet`, ... Each shard row is one preference pair.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"
SHARD_PATTERN = "part-{:05d}.parquet"
FORMAT_NAME = "bso-cache"

# --- shard columns (the contract of DESIGN.md, plus the columns loss variants need) ----------
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


# --- manifest keys ---------------------------------------------------------------------------
# The manifest is JSON; `bso_cache.cache.manifest` reads and checks it. These are its top-level
# keys; `MANIFEST_REQUIRED` must be present in every finished cache.
MANIFEST_REQUIRED = (
    "format", "schema_version", "created", "bso_cache_version", "reference", "tokenizer",
    "input", "tokenization", "reference_pass", "rows", "shards", "columns",
)
# Settings that must match for a resumed build to continue an unfinished one.
BUILD_IDENTITY_KEYS = ("reference", "tokenizer", "input", "tokenization", "reference_pass", "layout")
