"""Evaluation, in one home: a model on a cache's pairs from the cached reference log-probs (no
reference model loaded), and `bso-cache eval` around it, optionally with the generation-based
evaluation (generation.py); results as JSON.

Over the pairs as oriented in the cache (chosen = the cached chosen response):
- preference_accuracy: share of pairs whose implicit reward r = log pi(y) - log pi_ref(y) is
  higher for chosen than for rejected (ties count as wrong);
- safety_accuracy: over pairs whose responses differ in safety, the share where the safe
  response has the higher implicit reward;
- mean implicit rewards and margins per pair type (chosen/rejected safety).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from bso_cache.losses import pair_outcomes
from bso_cache.data.pairs import PairBatch, epoch_batches
from bso_cache.schemas import PAIR_TYPES
from bso_cache.scoring.scorer import PairScorer
from bso_cache.cache import Cache, check_tokenizer
from bso_cache.io.files import atomic_write_json, require_writable
from bso_cache.config import DEFAULT_PREFIX_SHARING, EvalConfig
from bso_cache.errors import CacheError, ConfigError, OutputError
from bso_cache.training.preflight import check_eval



def evaluate_cache(model, cache: Cache, *, batch_size: int = 16, device: str = "cpu",
                   pad_id: int = 0, max_pairs: int | None = None, autocast: str = "none",
                   prefix_sharing: str = DEFAULT_PREFIX_SHARING, progress: bool = False) -> dict:
    """The metrics above, streamed over the cache in its stored order.

    `model` is a causal LM or a `PairScorer` (which then brings its device, padding, autocast
    and prefix-sharing decision); `progress`: a bar of pairs on stderr."""
    import torch
    from tqdm.auto import tqdm

    scorer = model if isinstance(model, PairScorer) else PairScorer(
        model, prefix_sharing=prefix_sharing, device=device, pad_id=pad_id, autocast=autocast)
    model = scorer.model
    was_training = model.training
    model.eval()
    per_type = defaultdict(lambda: {"n": 0, "chosen_reward": 0.0, "rejected_reward": 0.0, "margin": 0.0,
                                    "correct": 0})
    n = correct = differs = safe_wins = 0
    total = cache.num_pairs if max_pairs is None else min(cache.num_pairs, max_pairs)
    with torch.inference_mode(), tqdm(total=total, unit="pair", desc="evaluating", disable=not progress,
                                      dynamic_ncols=True) as bar:
        for batch in epoch_batches(cache, mode="none", orientation="better", batch_size=batch_size,
                                   seed=0, epoch=0, shuffle=False):
            if max_pairs is not None and n >= max_pairs:
                break
            pairs = PairBatch.of(batch, "cpu")
            lp = scorer(*pairs.token_ids)
            bar.update(min(len(batch), total - bar.n))
            rc = lp.chosen.double().cpu() - pairs.ref_chosen_logps
            rr = lp.rejected.double().cpu() - pairs.ref_rejected_logps
            o = pair_outcomes(rc - rr, pairs.chosen_unsafe, pairs.rejected_unsafe)
            for kind, c, r, ok in zip(o["pair_type"].tolist(), rc.tolist(), rr.tolist(), o["correct"].tolist()):
                t = per_type[PAIR_TYPES[kind]]
                t["n"] += 1
                t["chosen_reward"] += c
                t["rejected_reward"] += r
                t["margin"] += c - r
                t["correct"] += ok
            n += len(batch)
            correct += int(o["correct"].sum())
            differs += int(o["safety_differs"].sum())
            safe_wins += int(o["safe_wins"].sum())
    if was_training:
        model.train()
    types = {name: {"pairs": t["n"], "mean_chosen_reward": t["chosen_reward"] / t["n"],
                    "mean_rejected_reward": t["rejected_reward"] / t["n"],
                    "mean_margin": t["margin"] / t["n"], "preference_accuracy": t["correct"] / t["n"]}
             for name, t in sorted(per_type.items())}
    if n == 0:
        raise CacheError(f"{cache.path}: no pair to evaluate (the cache holds {cache.num_pairs}"
                         f"{'' if max_pairs is None else f', --max-pairs {max_pairs}'}); evaluate on a cache with pairs")
    return {
        "pairs": n,
        "preference_accuracy": correct / n,
        "safety_accuracy": safe_wins / differs if differs else None,  # no pair differs in safety
        "safety_pairs": differs,
        "mean_margin": sum(t["margin"] for t in per_type.values()) / n,
        "by_pair_type": types,
    }


def run_eval(cfg: EvalConfig) -> dict:
    """`bso-cache eval`: the cached figures of cfg.model on cfg.cache, and with --generate, sampled
    responses scored by the cost and reward models; written to cfg.results when given."""
    from bso_cache.reporting.generation import cache_prompts, generation_eval
    from bso_cache.models import load_model, load_tokenizer, resolve_attention, resolve_device

    check_eval(cfg)
    results = Path(cfg.results) if cfg.results else None
    generations = Path(cfg.generations) if cfg.generations else None
    if cfg.generate and generations is None:
        generations = (results.with_suffix(".generations.jsonl") if results else Path("generations.jsonl"))
    for path, option in ((results, "--results"), (generations if cfg.generate else None, "--generations")):
        if path is not None:
            require_writable(path, option, file=True)
    model, cache = cfg.model, Path(cfg.cache)
    c = Cache.open(cache, expect_digest=cfg.expect_digest)
    relation = reference_relation(model, cache, c.manifest, cfg.allow_other_reference, cfg.gguf_file)
    if relation == RELATIONS[1] and c.manifest.reference_quantization and not cfg.load_in_4bit:
        raise ConfigError(f"--cache {cache} was scored by the 4-bit ({c.manifest.reference_quantization}) version of "
                          f"{model}: pass --load-in-4bit to evaluate it as that reference (or evaluate a QLoRA run's "
                          f"saved model, which needs no flag)")
    tok = load_tokenizer(model, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code)
    check_tokenizer(cache, c.manifest, tok, model)
    dev = resolve_device(cfg.device)
    lm = load_model(model, dtype=cfg.dtype, device=dev, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code,
                    load_in_4bit=cfg.load_in_4bit,
                    attn_implementation=resolve_attention(cfg.attn_implementation, dev, training=False))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    res = evaluate_cache(lm, c, batch_size=cfg.batch_size, device=dev, pad_id=pad, max_pairs=cfg.max_pairs,
                         prefix_sharing=cfg.prefix_sharing, progress=cfg.progress)
    res["reference"] = {"name_or_path": c.manifest.reference_name, "relation": relation}
    if cfg.generate:
        res["generation"] = generation_eval(lm, tok, cache_prompts(c, cfg.max_prompts), cost_model=cfg.cost_model,
                                            reward_model=cfg.reward_model, out_jsonl=generations, device=dev,
                                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                            top_p=cfg.top_p, seed=cfg.seed)
        res["generation"]["generations"] = str(generations)
    if results is not None:
        try:
            atomic_write_json(results, res)
        except OutputError:  # written late and failed (a full disk): the result is not lost
            print(json.dumps(res, allow_nan=False))
            raise
    return res


# how the cache's reference stands to the evaluated model
RELATIONS = ("the run's starting point", "the model itself", "another model (allowed)", "unknown")


def reference_relation(model: str, cache: Path, manifest, allow: bool, gguf_file: str | None = None) -> str:
    """The implicit reward is log pi - log pi_ref with the cache's reference: meaningful against the
    model's starting point. A training run records it (run_config.json); a run that started from
    other weights is refused unless `allow`; a plain model is either the reference itself or of
    unknown origin (reported as such)."""

    from bso_cache.models import resolve_dir, weights_digest
    from bso_cache.schemas import RunLayout

    folder = resolve_dir(model)
    config = folder / RunLayout.RUN_CONFIG if folder is not None else None
    if config is not None and config.is_file():
        try:
            run = json.loads(config.read_text())
        except (OSError, json.JSONDecodeError):
            run = {}
        start = run.get("start_weights_digest")
        if start == manifest.weights_digest:
            return RELATIONS[0]
        if start is not None:
            if not allow:
                raise ConfigError(other_reference(f"--cache {cache}", manifest.reference_name,
                                                  f"{run.get('policy')} (run_config.json of {model})"))
            return RELATIONS[2]
    try:
        return RELATIONS[1] if weights_digest(model, gguf_file) == manifest.weights_digest else RELATIONS[3]
    except (OSError, ValueError, ConfigError):
        return RELATIONS[3]


def other_reference(what: str, reference: str, start: str) -> str:
    """The refusal of rewards measured against another reference than the one a model started from."""
    return (f"{what} was built with the reference {reference}, but the model started from {start}: the implicit "
            f"rewards (log pi - log pi_ref) against that reference are not the ones it was trained on. Use a cache "
            f"built with the model it started from, or pass --allow-other-reference to report them relative to "
            f"{reference}")
