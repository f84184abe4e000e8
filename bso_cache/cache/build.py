"""`bso-cache build`: score every pair with the frozen reference once; the cache's one writer
(`cache.CacheWriter`) puts the shards and the manifest on disk.

Shard k holds the pairs of input rows [k * rows_per_shard, (k + 1) * rows_per_shard), so the
split of the work is fixed by the input alone: a killed build resumes by skipping the shards
already done, and torchrun ranks score the shards k with k % world == rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from pathlib import Path

from bso_cache import schemas as S
from bso_cache.cache import CacheWriter, Manifest, counts_text, empty_columns, read_manifest
from bso_cache.config import DEFAULT_MAX_LENGTH, DEFAULT_ROWS_PER_SHARD, BuildConfig, to_dict
from bso_cache.quantize import QUANT_TYPE
from bso_cache.data.formats import Normaliser, Pair, scan_input
from bso_cache.data.sources import open_source
from bso_cache.training.preflight import check_build
from bso_cache.io.allocator import return_freed_memory
from bso_cache.io.dist import Dist
from bso_cache.errors import ConfigError, DataError
from bso_cache.io.files import check_out
from bso_cache.models import (load_model, load_tokenizer, model_identity, resolve_attention, resolve_device,
                              weights_digest)
from bso_cache.data.tokenize import PairTokens, PairTokenizer, apply_length_policy, tokenizer_digest


def _model_max_length(cfg: BuildConfig) -> int | None:
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        mc = AutoConfig.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a model config from '{cfg.model}': {e}") from None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(mc, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _identity(cfg: BuildConfig, source, ptok: PairTokenizer, max_length: int, device: str,
              rows_per_shard: int) -> dict:
    return {
        "reference": {"name_or_path": cfg.model, "gguf_file": cfg.gguf_file,
                      "weights_digest": weights_digest(cfg.model, cfg.gguf_file)},
        "tokenizer": {"digest": ptok.digest(), "vocab_digest": tokenizer_digest(ptok.tok, None),
                      "mode": ptok.mode, "name_or_path": cfg.model,
                      "chat_template_digest": "sha256:" + hashlib.sha256(
                          (ptok.chat_template or "").encode()).hexdigest(),
                      "class": type(ptok.tok).__name__},
        "input": {**source.describe(), "digest": source.digest(), "format": cfg.format},
        "tokenization": {"max_length": max_length, "overlong": cfg.overlong,
                         "template": ptok.mode, "system_prompt": cfg.system_prompt},
        "reference_pass": {"dtype": cfg.dtype, "device_kind": device.split(":")[0],
                           **({"quantization": QUANT_TYPE} if cfg.load_in_4bit else {})},
        "layout": {"rows_per_shard": rows_per_shard},
    }


def _pair_columns(pairs: list[Pair], encoded: list[PairTokens], chosen: list[float],
                  rejected: list[float]) -> dict[str, list]:
    cols = empty_columns()
    for p, e, c, r in zip(pairs, encoded, chosen, rejected):
        cols[S.PAIR_ID].append(p.pair_id)
        cols[S.SOURCE_INDEX].append(p.source_index)
        cols[S.PROMPT_IDS].append(e.prompt_ids)
        cols[S.CHOSEN_IDS].append(e.chosen_ids)
        cols[S.REJECTED_IDS].append(e.rejected_ids)
        cols[S.REF_CHOSEN_LOGP].append(c)
        cols[S.REF_REJECTED_LOGP].append(r)
        cols[S.CHOSEN_UNSAFE].append(p.chosen_unsafe)
        cols[S.REJECTED_UNSAFE].append(p.rejected_unsafe)
        cols[S.SAFER_IS_CHOSEN].append(p.safer_is_chosen)
        cols[S.CHOSEN_SEVERITY].append(p.chosen_severity)
        cols[S.REJECTED_SEVERITY].append(p.rejected_severity)
        cols[S.TRUNCATED].append(e.truncated)
    return cols


def _on_off(value) -> str:
    return {True: "on", False: "off"}.get(value, str(value))


def _pair_tokenizer(cfg: BuildConfig, tokenizer) -> PairTokenizer:
    chat_template = None
    if cfg.chat_template:
        try:
            chat_template = Path(cfg.chat_template).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"--chat-template {cfg.chat_template}: {e.strerror}") from None
        if not chat_template.strip():  # would silently leave the tokenizer's own template in force
            raise ConfigError(f"--chat-template {cfg.chat_template}: the file is empty; give a Jinja chat "
                              f"template, or drop the option to use the tokenizer's")
    return PairTokenizer(tokenizer, template=cfg.template, chat_template=chat_template,
                         system_prompt=cfg.system_prompt)


def _max_length(cfg: BuildConfig) -> int:
    """--max-length, or min(DEFAULT_MAX_LENGTH, the model's positions); never past the model's."""
    model_max = _model_max_length(cfg)
    max_length = cfg.max_length or min(DEFAULT_MAX_LENGTH, model_max or DEFAULT_MAX_LENGTH)
    if model_max and max_length > model_max:
        raise ConfigError(f"--max-length {max_length} exceeds the model's {model_max} positions")
    return max_length


def _reference_scorer(plan: "_Plan", model, log):
    """The reference's pair scorer. Its prefix-sharing decision is made on the first shard's pairs,
    whichever shards this process scores: a resumed build, and every torchrun rank, decide as a
    fresh single-process build does, so its shards are the same bytes."""
    from bso_cache.scoring.scorer import PairScorer

    tokenizer = plan.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return PairScorer(model, prefix_sharing=plan.cfg.prefix_sharing, sample=_first_shard_pairs(plan),
                      device=plan.device, pad_id=pad_id, log=log)


def _first_shard_pairs(plan: "_Plan") -> tuple[list, list, list]:
    """The token ids of the first shard's pairs as they are scored (rows that fail or are dropped
    left out): what the prefix-sharing decision is made on."""
    import itertools

    if plan.cfg.prefix_sharing == "off":
        return [], [], []
    normalise, pairs = Normaliser(plan.fmt), []
    for index, raw in itertools.islice(enumerate(plan.source.rows()), min(plan.rows_per_shard, plan.n_input)):
        try:
            pairs.append(normalise(raw, index))
        except DataError:
            continue
    encoded = [apply_length_policy(e, plan.max_length, plan.cfg.overlong)[0]
               for _, e in _encode(plan.ptok, pairs, True, {})]
    kept = [e for e in encoded if e is not None]
    return [e.prompt_ids for e in kept], [e.chosen_ids for e in kept], [e.rejected_ids for e in kept]


def build_cache(cfg: BuildConfig, *, log=print) -> Manifest:
    """Run a build (or resume one) and return the manifest."""
    check_build(cfg)
    return_freed_memory()  # the C heap's policy, as the command line sets it (io/allocator.py)
    device = resolve_device(cfg.device)
    dist = Dist.from_env(device)
    if dist.enabled and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
    out = Path(cfg.out)
    check_out(out, "cache")
    source = open_source(cfg.data, split=cfg.split, hf_config=cfg.hf_config)
    tokenizer = load_tokenizer(cfg.model, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)
    ptok = _pair_tokenizer(cfg, tokenizer)
    max_length = _max_length(cfg)
    n_input, fmt, duplicates = scan_input(source, cfg.format, cfg.skip_bad_rows)
    # the same layout whatever the number of ranks (a cache and its resume do not depend on it); an input
    # of fewer than DEFAULT_ROWS_PER_SHARD rows is one shard, scored by rank 0
    R = cfg.rows_per_shard or min(DEFAULT_ROWS_PER_SHARD, n_input)
    plan = _Plan(cfg, out, device, dist, source, fmt, tokenizer, ptok, max_length, n_input, R,
                 _identity(cfg, source, ptok, max_length, device, R), log, duplicates)
    try:
        with CacheWriter(out, plan.identity, overwrite=cfg.overwrite, dist=dist) as writer:
            return _build(plan, writer)
    finally:
        dist.close()


@dataclasses.dataclass
class _Plan:
    """What one build was asked and resolved to, handed to its steps."""

    cfg: BuildConfig
    out: Path
    device: str
    dist: Dist
    source: object
    fmt: str
    tokenizer: object
    ptok: PairTokenizer
    max_length: int
    n_input: int
    rows_per_shard: int
    identity: dict
    log: object
    duplicates: int = 0  # input rows repeating an earlier row's prompt and responses


def _build(plan: _Plan, writer: CacheWriter) -> Manifest:
    cfg, out, dist, log, R = plan.cfg, plan.out, plan.dist, plan.log, plan.rows_per_shard
    if writer.complete is not None:
        log(f"{out}: this cache is already complete ({writer.complete.written} pairs); nothing to do")
        return writer.complete
    n_blocks = math.ceil(plan.n_input / R)
    mine = [k for k in range(n_blocks) if k % dist.world == dist.rank]
    todo = [k for k in mine if not writer.done(k)]
    if dist.is_main:
        log(f"input: {plan.n_input} rows from {cfg.data} ({n_blocks} shards of {R} input rows; "
            f"{len(mine) - len(todo)} already done); template: {plan.ptok.mode}; max length {plan.max_length}")
    ref_info = _score_todo(plan, writer, todo) if todo else None
    dist.barrier()
    manifest = _fold(plan, writer, n_blocks, ref_info) if dist.is_main else None
    dist.barrier()
    return manifest if dist.is_main else read_manifest(out)


def _score_todo(plan: _Plan, writer: CacheWriter, todo: list[int]) -> dict:
    """Load the reference once and score this rank's unfinished shards; returns what the manifest
    records about the model beyond its identity."""
    cfg = plan.cfg
    model = load_model(cfg.model, dtype=cfg.dtype, device=plan.device, gguf_file=cfg.gguf_file,
                       trust_remote_code=cfg.trust_remote_code, log=plan.log, load_in_4bit=cfg.load_in_4bit,
                       attn_implementation=resolve_attention(cfg.attn_implementation, plan.device, training=False))
    model.eval()
    reference = plan.identity["reference"]
    ref_info = {k: v for k, v in model_identity(cfg.model, cfg.gguf_file, model, reference["weights_digest"]).items()
                if k not in reference}
    scorer = _reference_scorer(plan, model, plan.log if plan.dist.is_main else (lambda s: None))
    _score_blocks(plan, writer, scorer, todo, ref_info)
    return ref_info


def _fold(plan: _Plan, writer: CacheWriter, n_blocks: int, ref_info: dict | None) -> Manifest:
    """Rank 0: the manifest from every finished shard, and the closing line."""
    manifest = writer.finish(n_blocks, plan.n_input, build_config=to_dict(plan.cfg), ref_info=ref_info,
                             input_notes={"duplicate_rows": plan.duplicates} if plan.duplicates else {},
                             batch_size=plan.cfg.batch_size)
    r, stats = manifest.rows, manifest.stats
    dropped = sum(r["dropped"].values())
    reasons = f" ({counts_text(r['dropped'])})" if dropped else ""
    plan.log(f"wrote {plan.out}: {r['written']} pairs in {len(manifest.shards)} shards; dropped {dropped}{reasons}; "
             f"{stats['pairs_per_s']} pairs/s, {stats['tokens_per_s']} tokens/s, "
             f"padding {100 * stats['padding_share']:.1f}%, prefix sharing {_on_off(stats['prefix_sharing'])}")
    warning = drop_warning(r["dropped"], plan.n_input, plan.cfg.max_length or plan.max_length)
    if warning:
        plan.log(warning)
    if plan.duplicates:
        plan.log(f"note: {plan.duplicates} input rows repeat an earlier row's prompt and responses; they are kept "
                 f"(manifest notes.duplicate_rows): deduplicate the input if they are not meant to count twice")
    return manifest


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


def _score_blocks(plan: _Plan, writer: CacheWriter, scorer, todo: list[int], ref_info: dict) -> None:
    from tqdm.auto import tqdm

    cfg, R, n_input = plan.cfg, plan.rows_per_shard, plan.n_input
    todo_set = set(todo)
    total = sum(min(R, n_input - k * R) for k in todo)
    bar = tqdm(total=total, unit="pair", desc="scoring", disable=not (cfg.progress and plan.dist.is_main),
               dynamic_ncols=True)
    t_bar = time.perf_counter()
    tokens_seen = [0]

    def on_batch(pairs: int, tokens: int) -> None:
        tokens_seen[0] += tokens
        bar.update(pairs)
        bar.set_postfix_str(f"{tokens_seen[0] / max(time.perf_counter() - t_bar, 1e-9):,.0f} tok/s")

    normalise = Normaliser(plan.fmt)
    block: list = []
    block_k = 0
    for index, raw in enumerate(plan.source.rows()):
        k = index // R
        if k not in todo_set:
            continue
        block_k = k
        block.append((index, raw))
        if len(block) == min(R, n_input - k * R):
            _score_block(plan, writer, normalise, scorer, k, block, on_batch, ref_info)
            block = []
    if block:  # the input shrank between the passes
        raise DataError(f"the input changed while building (shard {block_k} is short)",
                        reason="input_changed", source=cfg.data)
    bar.close()


def _score_block(plan: _Plan, writer: CacheWriter, normalise: Normaliser, scorer, k: int, block: list, on_batch,
                 ref_info: dict) -> None:
    cfg, ptok = plan.cfg, plan.ptok
    t0 = time.perf_counter()
    dropped: dict[str, int] = {}
    notes_before = dict(normalise.notes)
    pairs: list[Pair] = []
    for index, raw in block:
        try:
            pairs.append(normalise(raw, index))
        except DataError as e:
            if not cfg.skip_bad_rows:
                raise
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
    kept_pairs, kept_enc = [], []
    encoded = _encode(ptok, pairs, cfg.skip_bad_rows, dropped)
    for p, e in encoded:
        e2, reason = apply_length_policy(e, plan.max_length, cfg.overlong)
        if e2 is None:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            kept_pairs.append(p)
            kept_enc.append(e2)
    skipped = len(block) - len(kept_pairs)
    chosen, rejected, stats = scorer.score_all([e.prompt_ids for e in kept_enc], [e.chosen_ids for e in kept_enc],
                                               [e.rejected_ids for e in kept_enc], batch_size=cfg.batch_size,
                                               on_batch=on_batch)
    stats["prefix_sharing"] = bool(scorer.sharing)
    if skipped:
        on_batch(skipped, 0)
    notes = {key: n - notes_before.get(key, 0) for key, n in normalise.notes.items()
             if n - notes_before.get(key, 0)}
    for added in (ptok.adds_system_prompt(p) for p in kept_pairs):
        if added is not None:
            key = "system_prompt_added" if added else "system_prompt_not_added_row_has_own"
            notes[key] = notes.get(key, 0) + 1
    writer.write(k, _pair_columns(kept_pairs, kept_enc, chosen, rejected), input_rows=(block[0][0], block[-1][0] + 1),
                 dropped=dropped, notes=notes, reference=ref_info, stats=stats, started=t0)
    _release_memory()


def _release_memory() -> None:
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


def _encode(ptok: PairTokenizer, pairs: list[Pair], skip_bad_rows: bool,
            dropped: dict[str, int]) -> list[tuple[Pair, PairTokens]]:
    """Encode pairs in one batched call; on a template error fall back to row by row."""
    try:
        return list(zip(pairs, ptok.encode_many(pairs)))
    except DataError:
        pass
    out = []
    for p in pairs:
        try:
            out.append((p, ptok.encode_many([p])[0]))
        except DataError as e:
            if not skip_bad_rows:
                raise
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
    return out
