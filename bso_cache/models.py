"""Loading models and tokenizers (the only place that does), and what identifies them.

Weights load through `from_pretrained` (local folder, hub id in the local cache, or a GGUF
file), with safetensors required for folders, and `trust_remote_code` only when asked.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from pathlib import Path

from bso_cache.config import DTYPES
from bso_cache.errors import ConfigError
from bso_cache.hashing import sha256_files
from bso_cache.quantize import forget_quantizer, prepare_loaded, quantization_config
from bso_cache.schemas import RunLayout

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


def torch_dtype(name: str):
    import torch

    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ConfigError(f"unknown dtype '{name}'; valid: {', '.join(DTYPES)}") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"unknown --device '{device}'; use auto, cpu or cuda[:N]")
    return device


def resolve_dir(name_or_path: str) -> Path | None:
    """The local folder holding a model: the path itself, or its snapshot in the HF cache."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists() or name_or_path.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not in the local cache
        return None


def locate_reference(reference: dict) -> str:
    """Where a cache's reference model is on this machine: the absolute folder the build resolved,
    else the name as given (a relative path from the build's folder, or a hub id in the local
    cache). A reference that is truly gone is an error that says how to train anyway."""
    for candidate in (reference.get("resolved_path"), reference.get("name_or_path")):
        if candidate and resolve_dir(candidate) is not None:
            return candidate
    raise ConfigError(
        f"the cache's reference model {reference.get('name_or_path')!r} (built from "
        f"{reference.get('resolved_path') or 'the Hugging Face cache'}) is not on this machine; pass --policy PATH "
        f"(or a hub id in the local cache) of the model to train, which must share the cache's tokenizer")


def weights_digest(name_or_path: str, gguf_file: str | None = None) -> str:
    """sha256 over the weight files (names and bytes), the identity of the weights on disk."""
    folder = resolve_dir(name_or_path)
    if folder is None:
        raise ConfigError(f"model '{name_or_path}': not a local folder and not in the Hugging Face "
                          f"cache; download it first (huggingface-cli download {name_or_path})")
    if gguf_file:
        files = [folder / gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        legacy = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" (found {', '.join(legacy)}: pickled weights are not loaded; convert them to "
                f"safetensors)") if legacy else ""
        raise ConfigError(f"model '{name_or_path}': no .safetensors weights in {folder}{hint}")
    return sha256_files(files)


def quiet_transformers() -> None:
    """No per-load progress bars, and no warning about sequences over the tokenizer's nominal
    maximum: lengths are bso-cache's own policy (--max-length), checked against the model."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _refuse_checkpoint(name_or_path: str) -> None:
    """A training checkpoint folder holds weights and optimizer state, not a loadable model."""
    p = Path(name_or_path)
    if (p / RunLayout.TRAINER_STATE).is_file() and (p / RunLayout.CHECKPOINT_STATE).is_file():
        run = p.parent.parent if p.parent.name == RunLayout.CHECKPOINTS else p.parent
        raise ConfigError(f"{p} is a training checkpoint (weights, optimizer and RNG state for --resume), not a "
                          f"model folder: use the run folder {run} (its final model and tokenizer), or finish the "
                          f"run with `bso-cache train ... --out {run} --resume`")


def load_tokenizer(name_or_path: str, *, gguf_file: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _refuse_checkpoint(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a tokenizer from '{name_or_path}': {e}") from None
    return tok


# `--attn-implementation auto`, by device kind (docs/GPU.md): on an H200
# FlexAttention's layouts were exact but slower than SDPA's for both the build and the training
# step, so SDPA there too; the CPU has no FlexAttention backward.
AUTO_ATTENTION = {"cpu": "sdpa", "cuda": "sdpa"}


def resolve_attention(choice: str, device: str, *, training: bool) -> str:
    """transformers' attention implementation for --attn-implementation on this device."""
    kind = str(device).split(":")[0]
    name = AUTO_ATTENTION.get(kind, "sdpa") if choice == "auto" else choice
    if name == "flex_attention":
        import torch

        try:
            from torch.nn.attention import flex_attention  # noqa: F401
        except ImportError:
            raise ConfigError(f"--attn-implementation flex_attention needs FlexAttention (torch >= 2.5); this is "
                              f"torch {torch.__version__}: use sdpa") from None
        if training and kind == "cpu":
            raise ConfigError(f"--attn-implementation flex_attention: torch {torch.__version__} has no FlexAttention "
                              f"backward on the CPU, so training with it needs a GPU; train with sdpa here (build, "
                              f"eval and verify can use flex_attention on the CPU)")
    return name


def load_model(name_or_path: str, *, dtype: str = "float32", device: str = "cpu",
               gguf_file: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str | None = None, load_in_4bit: bool = False, log=None):
    """Load a causal LM; `load_in_4bit`: its linear layers in
    4-bit NF4 computing in `dtype` (quantize.py). A model whose transformers class has no
    FlexAttention support loads with sdpa instead, with one line through `log`."""
    common = dict(dtype=dtype, device=device, gguf_file=gguf_file, trust_remote_code=trust_remote_code,
                  load_in_4bit=load_in_4bit)
    try:
        return _load_model(name_or_path, attn_implementation=attn_implementation, **common)
    except _NoFlex as e:
        (log or print)(f"attention: {e}; using sdpa")
        return _load_model(name_or_path, attn_implementation="sdpa", **common)


def _load_model(name_or_path: str, *, dtype: str, device: str, gguf_file: str | None, trust_remote_code: bool,
                attn_implementation: str | None, load_in_4bit: bool):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = True
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:  # quantized as it loads, onto the device (a 4-bit model cannot be moved after)
        kwargs.update(quantization_config=quantization_config(dtype), device_map={"": device})
    quiet_transformers()
    model = None if gguf_file or load_in_4bit else _load_converting(
        name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation)
    if model is None:
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError) as e:
            if attn_implementation == "flex_attention" and "flex" in str(e).lower():
                raise _NoFlex(f"{name_or_path} has no FlexAttention support in transformers") from None
            raise ConfigError(f"could not load a model from '{name_or_path}': {e}") from None
    if gguf_file:
        _forget_gguf_quantizer(model, name_or_path)
    if load_in_4bit:
        prepare_loaded(model, device)
        return model
    return model.to(device)


class _NoFlex(Exception):
    pass


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _safetensors_layout(folder: Path) -> dict[str, tuple[Path, str, list[int], int, int]] | None:
    """name -> (file, dtype, shape, start, end) of every tensor of a safetensors checkpoint (one file
    or an index), read from the headers alone; None if the folder holds no such checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        return None
    layout = {}
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if meta["dtype"] not in _SAFETENSORS_DTYPES:
                return None
            start, end = meta["data_offsets"]
            layout[name] = (f, _SAFETENSORS_DTYPES[meta["dtype"]], meta["shape"], 8 + n + start, 8 + n + end)
    return layout


def _load_converting(name_or_path: str, *, dtype: str, device: str, trust_remote_code: bool,
                     attn_implementation: str | None):
    """A local safetensors checkpoint stored in another floating dtype than `dtype` (a float32 model
    trained in bf16), loaded tensor by tensor with plain reads into a model built in `dtype` on
    `device`: the host holds one tensor of the stored dtype at a time. `from_pretrained` instead
    maps the whole file and converts from the mapping, so the stored checkpoint's pages and the
    converted model are resident together (docs/PERFORMANCE-MEMORY.md). Returns None where `from_pretrained` is the
    right path: the same dtype (its mapping costs nothing), no local safetensors checkpoint, or
    tensor names that are not exactly the model's (transformers renames or converts on load)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    folder = resolve_dir(name_or_path)
    layout = _safetensors_layout(folder) if folder is not None else None
    stored = {d for _, d, *_ in (layout or {}).values() if d.startswith(("float", "bfloat"))}
    if not layout or stored == {dtype}:
        return None
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with no_init_weights(), torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype),
                                                     trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError):
        return None
    model.tie_weights()
    targets = model.state_dict(keep_vars=True)
    tied = {name for name, t in targets.items() if any(t is u for other, u in targets.items() if other != name)}
    if set(layout) - set(targets) or set(targets) - set(layout) - tied:
        return None
    with torch.no_grad():
        for name, (path, stored_dtype, shape, start, end) in layout.items():
            buf = bytearray(end - start)
            with open(path, "rb") as fh:
                fh.seek(start)
                fh.readinto(buf)
            src = torch.frombuffer(buf, dtype=getattr(torch, stored_dtype)).reshape(shape) if buf else \
                torch.empty(shape, dtype=getattr(torch, stored_dtype))
            targets[name].copy_(src)
            del src, buf
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.config.name_or_path = model.name_or_path = str(name_or_path)
    return model.eval()


def _forget_gguf_quantizer(model, name_or_path: str) -> None:
    """transformers de-quantizes GGUF weights to ordinary float tensors on load but keeps a GGUF
    quantizer attached, which makes `save_pretrained` refuse the (trained) model. The weights are
    plain floating-point parameters (checked), so the model is detached from it."""
    bad = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if bad:
        raise ConfigError(f"model '{name_or_path}': GGUF weights {bad[:3]} stayed quantized; "
                          f"convert the model to safetensors first")
    forget_quantizer(model)


def load_classifier(name_or_path: str, *, device: str = "cpu", trust_remote_code: bool = False):
    """A sequence-classification model (reward or cost model) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, use_safetensors=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not load a sequence-classification model from '{name_or_path}': {e}") from None
    tok = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device).eval(), tok


def model_identity(name_or_path: str, gguf_file: str | None, model, weights: str) -> dict:
    """What the manifest records about a model (`weights`: its weights_digest, computed once)."""
    folder = resolve_dir(name_or_path)
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    config.pop("_name_or_path", None)
    return {
        "name_or_path": str(name_or_path),
        "resolved_path": str(folder.resolve()) if folder else None,
        "gguf_file": gguf_file,
        "weights_digest": weights,
        "config_digest": "sha256:" + hashlib.sha256(
            json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
        "model_type": getattr(model.config, "model_type", None),
        "vocab_size": getattr(model.config, "vocab_size", None),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def disable_dropout(model) -> None:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant, under the name this transformers has
    (5.25 renamed `gradient_checkpointing_enable`, deprecated, to `activation_checkpointing_enable`)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def add_lora(cfg, model):
    """`cfg.lora_r` adapters on `cfg.lora_target` (peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--lora-r needs the `peft` package: pip install 'bso-cache[lora]'") from None
    target = "all-linear" if cfg.lora_target == "all-linear" else cfg.lora_target.split(",")
    # Adapters in the weights' dtype: peft's default makes bf16/fp16 adapters float32, and each
    # adapted layer then casts its input to float32, a copy autograd keeps for the backward (docs/GPU.md;
    # tests/test_options.py counts the saved bytes).
    # Low-precision adapters learn through the optimizer's stochastic rounding (optim.py).
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                lora_dropout=cfg.lora_dropout, target_modules=target,
                                                task_type="CAUSAL_LM"),
                              autocast_adapter_dtype=cfg.dtype == "float32")
