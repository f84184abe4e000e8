"""Glue for CLI commands that combine several library calls (kept out of app.py's option lists)."""

from __future__ import annotations

import json
from pathlib import Path


def run_eval(*, model: str, cache: Path, out: Path | None, batch_size: int, max_pairs: int | None, device: str,
             dtype: str, generate: bool, cost_model: str | None, reward_model: str | None, max_prompts: int,
             max_new_tokens: int, temperature: float, top_p: float, generations: Path | None, seed: int,
             prefix_sharing: str = "auto") -> dict:
    from bso_cache.cache import Cache, check_tokenizer
    from bso_cache.errors import ConfigError
    from bso_cache.generation import cache_prompts, generation_eval
    from bso_cache.metrics import evaluate_cache
    from bso_cache.models import load_model, load_tokenizer, resolve_device

    c = Cache.open(cache)
    tok = load_tokenizer(model)
    check_tokenizer(cache, c.manifest, tok, model)
    dev = resolve_device(device)
    lm = load_model(model, dtype=dtype, device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    res = evaluate_cache(lm, c, batch_size=batch_size, device=dev, pad_id=pad, max_pairs=max_pairs,
                         prefix_sharing=prefix_sharing)
    if generate:
        if not (cost_model or reward_model):
            raise ConfigError("--generate needs --cost-model and/or --reward-model to score the responses")
        if generations is None:
            generations = (out.with_suffix(".generations.jsonl") if out else Path("generations.jsonl"))
        res["generation"] = generation_eval(lm, tok, cache_prompts(c, max_prompts), cost_model=cost_model,
                                            reward_model=reward_model, out_jsonl=generations, device=dev,
                                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed)
        res["generation"]["generations"] = str(generations)
    if out is not None:
        Path(out).write_text(json.dumps(res, indent=2))
    return res
