"""`bso-cache eval`: a model on a cache's pairs from the cached reference log-probs (metrics.py),
and optionally the generation-based evaluation (generation.py); results as JSON."""

from __future__ import annotations

import json
from pathlib import Path

from .cache import Cache, atomic_write_json, check_tokenizer, other_reference, require_writable
from .errors import CacheError, ConfigError
from .metrics import evaluate_cache


def run_eval(*, model: str, cache: Path, out: Path | None, batch_size: int, max_pairs: int | None, device: str,
             dtype: str, generate: bool, cost_model: str | None, reward_model: str | None, max_prompts: int,
             max_new_tokens: int, temperature: float, top_p: float, generations: Path | None, seed: int,
             prefix_sharing: str = "auto", attn_implementation: str = "auto",
             allow_other_reference: bool = False, gguf_file: str | None = None, progress: bool = False) -> dict:
    from .generation import cache_prompts, generation_eval
    from .models import load_model, load_tokenizer, resolve_attention, resolve_device

    if generate and not (cost_model or reward_model):  # before any work, so no result is computed and lost
        raise ConfigError("--generate needs --cost-model and/or --reward-model to score the responses")
    if generate and generations is None:
        generations = (out.with_suffix(".generations.jsonl") if out else Path("generations.jsonl"))
    for path, option in ((out, "--out"), (generations if generate else None, "--generations")):
        if path is not None:
            require_writable(Path(path), option, file=True)
    c = Cache.open(cache)
    relation = reference_relation(model, cache, c.manifest, allow_other_reference, gguf_file)
    tok = load_tokenizer(model, gguf_file=gguf_file)
    check_tokenizer(cache, c.manifest, tok, model)
    dev = resolve_device(device)
    lm = load_model(model, dtype=dtype, device=dev, gguf_file=gguf_file,
                    attn_implementation=resolve_attention(attn_implementation, dev, training=False))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    res = evaluate_cache(lm, c, batch_size=batch_size, device=dev, pad_id=pad, max_pairs=max_pairs,
                         prefix_sharing=prefix_sharing, progress=progress)
    res["reference"] = {"name_or_path": c.manifest.reference_name, "relation": relation}
    if generate:
        res["generation"] = generation_eval(lm, tok, cache_prompts(c, max_prompts), cost_model=cost_model,
                                            reward_model=reward_model, out_jsonl=generations, device=dev,
                                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed)
        res["generation"]["generations"] = str(generations)
    if out is not None:
        try:
            atomic_write_json(Path(out), res)
        except CacheError:  # written late and failed (a full disk): the result is not lost
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

    from .models import resolve_dir, weights_digest
    from .schemas import RunLayout

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
