"""QLoRA's base: a model's linear layers loaded in 4-bit NF4 (bitsandbytes), and a trained QLoRA
model turned back into an ordinary one for saving.

The reference of a QLoRA run is its 4-bit base (the policy with its adapters at zero), as in
TRL and peft, where the reference is the quantized model with the adapters disabled. So the cache
of a QLoRA run is built from the same 4-bit model (`build --load-in-4bit`, recorded in the
manifest's `reference_pass.quantization`), and `train` refuses a cache and a policy whose
quantization differ: a 4-bit policy is not its full-precision reference at step 0, and a small
quantization gap could pass the loose bf16 step-0 tolerance (0.05 nats per token).

The saved model is the trained function itself, dequantize(W_nf4) + (alpha / r) B A per adapted
layer, as an ordinary model in --dtype: it loads without bitsandbytes, and its implicit rewards
against the 4-bit cache are those the run trained. (Re-quantizing the merged weights, as peft's
merge on a 4-bit layer does, would add a second rounding the run never saw.)
"""

from __future__ import annotations

from bso_cache.errors import ConfigError

QUANT_TYPE = "nf4"  # the QLoRA paper's 4-bit NormalFloat, blocks of 64 weights with one absmax each
# What bitsandbytes and torchao log on import about optional native kernels they could not load (a
# Hub kernel for bitsandbytes' AVX512-BF16 CPU path, which prepare_loaded turns off; torchao's CUDA
# extensions on a CPU machine): nothing a user can act on, and nothing bso-cache uses.
_IMPORT_NOTES = {"bitsandbytes": ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"),
                 "torchao": ("torchao", "torch.utils._pytree")}


def import_quietly(name: str):
    """`import name` (bitsandbytes or torchao) without the notes above; ImportError as usual."""
    import importlib
    import logging

    loggers = [logging.getLogger(n) for n in _IMPORT_NOTES[name]]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_quantization(what: str, cache_quantization: str | None, load_in_4bit: bool) -> None:
    """A cache and the policy trained on it agree on the reference's quantization (see above)."""
    if load_in_4bit and cache_quantization is None:
        raise ConfigError(f"{what}: its reference log-probs are the full-precision reference's, but a QLoRA policy "
                          f"starts as the 4-bit reference: build the cache with `bso-cache build --load-in-4bit`, "
                          f"or train without --load-in-4bit")
    if not load_in_4bit and cache_quantization is not None:
        raise ConfigError(f"{what}: it was scored by the 4-bit ({cache_quantization}) reference; train QLoRA on it "
                          f"(--load-in-4bit --lora-r 16), or build a full-precision cache")


def check_load_in_4bit(gguf_file: str | None, *, adapters: bool = False) -> None:
    """What --load-in-4bit needs, checked before any model loads: safetensors weights (not a GGUF
    file), and its libraries (with `adapters`, for training: peft too)."""
    import importlib.util

    if gguf_file:
        raise ConfigError("--load-in-4bit quantizes safetensors weights with bitsandbytes; a GGUF file is "
                          "de-quantized on load and is not supported with it: convert the model to safetensors, "
                          "or drop --load-in-4bit")
    needed = ("bitsandbytes", "accelerate") + (("peft",) if adapters else ())
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--load-in-4bit needs {', '.join(missing)}: pip install 'bso-cache[qlora]'")


def quantization_config(dtype: str):
    """transformers' BitsAndBytesConfig for the 4-bit base, computing in `dtype`."""
    import importlib.util

    import torch

    try:
        import_quietly("bitsandbytes")
        if importlib.util.find_spec("torchao") is not None:  # transformers imports it with quantization
            import_quietly("torchao")
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError("--load-in-4bit needs bitsandbytes (and accelerate): pip install 'bso-cache[qlora]'") \
            from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QUANT_TYPE,
                              bnb_4bit_compute_dtype=getattr(torch, dtype), bnb_4bit_use_double_quant=False)


def prepare_loaded(model, device: str) -> None:
    """On the CPU, keep every 4-bit layer on bitsandbytes' de-quantizing path. Its no-grad forward
    in eval mode otherwise repacks the weights in place for a CPU kernel (on CPUs with AVX512-BF16),
    which needs layer widths divisible by 32 and computes other roundings than the training
    forward: a build and the step-0 check of its QLoRA run would score the same model two ways."""
    if device.split(":")[0] != "cpu":
        return
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def merged_model(peft_model, dtype: str):
    """The transformers model inside `peft_model` with each LoRA layer replaced by one Linear holding
    dequantize(base weight) + its adapter's delta, in `dtype`, in host memory; detached from its
    quantizer. For saving only: the layers it merges leave the accelerator (the trainer evaluates
    before it saves)."""
    import torch
    from bitsandbytes.functional import dequantize_4bit
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    target = getattr(torch, dtype)
    with torch.no_grad():
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
            base = layer.get_base_layer()
            weight = base.weight
            if getattr(weight, "quant_state", None) is not None:
                weight = dequantize_4bit(weight.data, weight.quant_state)
            merged = weight.float() + sum(layer.get_delta_weight(a).float() for a in layer.active_adapters)
            # in host memory: the full-precision model is what a QLoRA run could not hold on its GPU
            linear = torch.nn.Linear(merged.shape[1], merged.shape[0], bias=base.bias is not None,
                                     device="cpu", dtype=target)
            linear.weight.copy_(merged)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, linear)
    forget_quantizer(model)
    return model


def forget_quantizer(model) -> None:
    """Detach a model whose weights are all ordinary floating-point tensors from the quantizer
    transformers attached on load (which would make `save_pretrained` write a quantized model)."""
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):  # an instance attribute set by from_pretrained
        model.is_quantized = False
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
