"""`bso-cache eval`: a model on a cache's pairs from the cached reference log-probs (metrics.py),
and optionally the generation-based evaluation (generation.py); results as JSON."""

from __future__ import annotations

from pathlib import Path

from .cache import Cache, atomic_write_json, check_tokenizer
from .errors import ConfigError
from .metrics import evaluate_cache


def run_eval(*, model: str, cache: Path, out: Path | None, batch_size: int, max_pairs: int | None, device: str,
             dtype: str, generate: bool, cost_model: str | None, reward_model: str | None, max_prompts: int,
             max_new_tokens: int, temperature: float, top_p: float, generations: Path | None, seed: int,
             prefix_sharing: str = "auto", attn_implementation: str = "auto") -> dict:
    from .generation import cache_prompts, generation_eval
    from .models import load_model, load_tokenizer, resolve_attention, resolve_device

    c = Cache.open(cache)
    tok = load_tokenizer(model)
    check_tokenizer(cache, c.manifest, tok, model)
    dev = resolve_device(device)
    lm = load_model(model, dtype=dtype, device=dev,
                    attn_implementation=resolve_attention(attn_implementation, dev, training=False))
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
        atomic_write_json(Path(out), res)
    return res
