"""`bso-cache plan`: the peak memory of a training run, predicted from the model's config alone.

No weights are loaded: the parameter counts come from the config (`config.json` of a local folder
or a hub id in the local cache), the token counts from `--max-length` or a cache's lengths. Each
component below is its largest size in a step; the peak is

    weights + optimizer state + runtime + max(activations + head, gradients + update)

since the gradients are made as the backward frees the activations (and dropped before the next
forward), except with `--optimizer-in-backward`, where one tensor's gradient and one update slice
live beside the activations: weights + state + runtime + activations + head + gradients + update.

    weights        parameters x bytes of --dtype (LoRA: + adapters in --dtype; QLoRA: 4-bit NF4 linear maps)
    gradients      trainable parameters x bytes of their dtype (in backward: the largest tensor)
    optimizer      trainable parameters x the optimizer's state bytes (offload: none on the GPU)
    update         bf16/fp16 weights or offload: the float32 working copy and gradient of one slice
                   (optim.SLICE elements, or the largest tensor if smaller) and its rounding buffers
    activations    per token and layer: ACT_PER_TOKEN_LAYER x hidden x activation bytes
                   (checkpointing: the layer inputs, plus one layer's full activations)
    head           the response positions' float32 softmax kept for the backward (<= 256 MiB) or
                   one chunk, and a trainable head's (V, H) weight gradient, made while the
                   activations are alive: float32 weights sum it in float32, a 16-bit head
                   writes it in its own dtype (by blocks of vocabulary rows, head.py)
    runtime        CUDA: context, kernels and workspaces (RUNTIME_CUDA); CPU: 0 (measured apart)

The constants are checked against measurements in docs/PERFORMANCE.md (`scripts/bench_memory.py`
on the CPU, `scripts/gpu_check.sh` on CUDA).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from bso_cache.config import TrainConfig, options
from bso_cache.errors import ConfigError
from bso_cache.scoring.head import STORED_SOFTMAX_BYTES, default_chunk
from bso_cache.training.optim import SLICE

GIB = 1 << 30
# Saved activations of one Llama-style decoder layer, per token, in units of `hidden` values:
# norm inputs and outputs (4), q, k, v, rotated q, k and the attention output (~6 with full kv;
# less with GQA, counted exactly below), the MLP's gate, up, activation and product (4 x
# intermediate / hidden); the rest (residual adds) saves nothing.
NORM_AND_ATTN_OUT = 6.0     # 2 norms x (input, output) + the attention output + o_proj input
MLP_PER_INTERMEDIATE = 4.0  # gate, up, act(gate), act(gate) * up
# The saved values above, counted op by op, overstate what is live at the peak on the CPU (a
# fraction of them are freed before the peak) and understate it on CUDA (the caching allocator's
# blocks, autocast's saved copies): each device's factor is fitted on the measured peaks of
# scripts/bench_memory.py (docs/PERFORMANCE-MEMORY.md) and scripts/gpu_check.sh (docs/GPU.md).
ACT_CALIBRATION = 0.7
ACT_CALIBRATION_CUDA = 1.2
RUNTIME_CUDA = 1 * GIB      # CUDA context, cuBLAS/cuDNN workspaces, allocator slack (an estimate)
STATE_BYTES = {"adamw": 8.0, "rmsprop": 4.0, "sgd": 0.0, "adamw8bit": 2.0, "rmsprop8bit": 1.0, "adamw4bit": 1.0}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from a transformers config."""

    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    largest_tensor: int          # elements of the largest parameter tensor (the embedding, usually)
    linear_params: int           # parameters in the decoder layers' linear maps (what LoRA / 4-bit touch)

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        h = int(cfg.hidden_size)
        layers = int(cfg.num_hidden_layers)
        inter = int(getattr(cfg, "intermediate_size", 4 * h))
        vocab = int(cfg.vocab_size)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or h // heads)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        bias = bool(getattr(cfg, "attention_bias", False)) or type(cfg).__name__.startswith("Qwen2")
        attn = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h
        attn_bias = (heads * head_dim + 2 * kv * head_dim) if bias else 0
        mlp = 3 * h * inter
        per_layer = attn + attn_bias + mlp + 2 * h  # + two RMSNorm weights
        embed = vocab * h
        params = layers * per_layer + embed + h + (0 if tied else embed)
        return cls(params=params, hidden=h, layers=layers, intermediate=inter, vocab=vocab, heads=heads,
                   kv_heads=kv, tied=tied, largest_tensor=max(embed, h * inter), linear_params=layers * (attn + mlp))

    def act_per_token_layer(self) -> float:
        """Saved activation values per token and layer (the MLP and attention as described above)."""
        kv_frac = self.kv_heads / self.heads
        attn = 2.0 + 2.0 * kv_frac + 2.0  # q, k, v (k, v at kv/heads width), rotated q and k
        return self.hidden * (NORM_AND_ATTN_OUT + attn) + MLP_PER_INTERMEDIATE * self.intermediate


_TRAIN = {o.name: o.default for o in options(TrainConfig)}  # the levers' defaults are train's


@dataclass(frozen=True)
class PlanOptions:
    """What memory depends on in a run: its levers (TrainConfig's plan=True options, `from_train`)
    and its shapes."""

    dtype: str = _TRAIN["dtype"]
    optimizer: str = _TRAIN["optimizer"]
    lora_r: int = _TRAIN["lora_r"]
    qlora: bool = _TRAIN["load_in_4bit"]
    gradient_checkpointing: bool = _TRAIN["gradient_checkpointing"]
    optimizer_in_backward: bool = _TRAIN["optimizer_in_backward"]
    optimizer_offload: bool = _TRAIN["optimizer_offload"]
    autocast: str = _TRAIN["autocast"]
    micro_batch: int = _TRAIN["batch_size"] // _TRAIN["grad_accum"]  # pairs per forward
    seq_length: int = 2048       # tokens of the longest sequence of a batch (prompt + the longer response)
    response_tokens: int = 1024  # tokens of the longer response of a pair (the scored positions)
    device: str = "cuda"

    @classmethod
    def from_train(cls, cfg, *, seq_length: int, response_tokens: int, device: str = "cuda") -> "PlanOptions":
        """What a TrainConfig's levers and batch mean for memory (its plan=True options)."""
        return cls(dtype=cfg.dtype, optimizer=cfg.optimizer, lora_r=cfg.lora_r, qlora=cfg.load_in_4bit,
                   gradient_checkpointing=cfg.gradient_checkpointing, optimizer_in_backward=cfg.optimizer_in_backward,
                   optimizer_offload=cfg.optimizer_offload, autocast=cfg.autocast, micro_batch=cfg.micro_batch,
                   seq_length=seq_length, response_tokens=response_tokens, device=device)


def _lora_params(shape: ModelShape, r: int) -> int:
    """Adapters on every linear map of the decoder layers ("all-linear"): r x (in + out) each."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * (shape.hidden // shape.heads)
    per_layer = r * ((h + h) + (h + kv) * 2 + (h + h) + 3 * (h + i))
    return shape.layers * per_layer


def predict(shape: ModelShape, o: PlanOptions) -> dict:
    """Peak bytes by component (see the module docstring) and their sum under `peak_bytes`."""
    if o.optimizer not in STATE_BYTES:
        raise ConfigError(f"unknown --optimizer '{o.optimizer}'; valid: {', '.join(STATE_BYTES)}")
    if o.dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown --dtype '{o.dtype}'; valid: {', '.join(DTYPE_BYTES)}")
    wb = DTYPE_BYTES[o.dtype]
    lora = o.lora_r > 0 or o.qlora
    adapters = _lora_params(shape, o.lora_r or 16) if lora else 0
    if o.qlora:  # NF4 base for the layers' linear maps (0.5 B + one float32 absmax per 64), the rest in dtype
        weights = shape.linear_params * (0.5 + 4 / 64) + (shape.params - shape.linear_params) * wb
    else:
        weights = shape.params * wb
    weights += adapters * wb  # adapters in the weights' dtype (QLoRA: the compute dtype), as models.add_lora makes them
    trainable, grad_bytes = (adapters, wb) if lora else (shape.params, wb)
    largest = (o.lora_r or 16) * max(shape.hidden, shape.intermediate) if lora else shape.largest_tensor
    grads = (min(largest, trainable) if o.optimizer_in_backward else trainable) * grad_bytes
    state = 0 if o.optimizer_offload else trainable * STATE_BYTES[o.optimizer]
    paramwise = grad_bytes != 4 or o.optimizer_offload or o.optimizer_in_backward
    # float32 copies of a slice and its gradient, and stochastic rounding's int32 noise and bf16 result
    update = 14 * min(largest, SLICE) if paramwise and (grad_bytes != 4 or o.optimizer_offload) else 0
    ab = 2 if o.autocast in ("bf16", "fp16") else wb
    tokens = 2 * o.micro_batch * o.seq_length
    per_layer = shape.act_per_token_layer() * ab * (ACT_CALIBRATION_CUDA if o.device.startswith("cuda")
                                                    else ACT_CALIBRATION)
    if o.gradient_checkpointing:
        acts = tokens * (shape.layers * shape.hidden * ab + per_layer)
    else:
        acts = tokens * shape.layers * per_layer
    acts += tokens * shape.hidden * (ab + 4)  # embedding output, final norm input (float32 statistics)
    positions = 2 * o.micro_batch * o.response_tokens
    stored = positions * shape.vocab * 4
    head = stored if stored <= STORED_SOFTMAX_BYTES else default_chunk(shape.vocab, o.device) * shape.vocab * 4
    head += positions * shape.hidden * 4  # the gathered hidden states
    if not lora and not o.optimizer_in_backward:
        # the head's (V, H) weight gradient, in the weights' dtype (float32: its accumulator); in the
        # backward pass it is the one gradient held, counted under gradients (the largest tensor)
        head += shape.vocab * shape.hidden * wb
    runtime = RUNTIME_CUDA if o.device.startswith("cuda") else 0
    parts = {"weights": weights, "gradients": grads, "optimizer_state": state, "update": update,
             "activations": acts, "head": head, "runtime": runtime}
    parts = {k: int(v) for k, v in parts.items()}
    if o.optimizer_in_backward:
        dynamic = acts + head + grads + update
    else:
        dynamic = max(acts + head, grads + update)
    return {**parts, "peak_bytes": int(weights + state + runtime + dynamic), "trainable_params": int(trainable),
            "params": shape.params, "offloaded_state_bytes": int(trainable * STATE_BYTES[o.optimizer])
            if o.optimizer_offload else 0}


def largest_batch(shape: ModelShape, o: PlanOptions, budget: int, limit: int = 4096) -> int:
    """The largest micro-batch (pairs) whose predicted peak fits `budget` bytes (0: none fits)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predict(shape, replace(o, micro_batch=mid))["peak_bytes"] <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


# The combinations `plan --gpu-memory` tries: name -> PlanOptions overrides.
LEVERS = {
    "fp32 rmsprop": {},
    "fp32 adamw": {"optimizer": "adamw"},
    "bf16": {"dtype": "bfloat16"},
    "bf16 + 8-bit": {"dtype": "bfloat16", "optimizer": "rmsprop8bit"},
    "bf16 + 8-bit + in-backward": {"dtype": "bfloat16", "optimizer": "rmsprop8bit", "optimizer_in_backward": True},
    "bf16 + 8-bit + in-backward + ckpt": {"dtype": "bfloat16", "optimizer": "rmsprop8bit",
                                          "optimizer_in_backward": True, "gradient_checkpointing": True},
    "bf16 + offload + in-backward + ckpt": {"dtype": "bfloat16", "optimizer_offload": True,
                                            "optimizer_in_backward": True, "gradient_checkpointing": True},
    "LoRA r16 (bf16 base) + ckpt": {"dtype": "bfloat16", "lora_r": 16, "gradient_checkpointing": True},
    "QLoRA r16 + ckpt": {"dtype": "bfloat16", "qlora": True, "lora_r": 16, "gradient_checkpointing": True},
}


_NO_LEVER = dict(dtype="float32", optimizer="rmsprop", lora_r=0, qlora=False, gradient_checkpointing=False,
                 optimizer_in_backward=False, optimizer_offload=False, autocast="none")


def combination(options: PlanOptions, name: str) -> PlanOptions:
    """`options` with the levers of LEVERS[name] and no other (the batch and lengths kept)."""
    return replace(options, **{**_NO_LEVER, **LEVERS[name]})


def load_shape(model: str, *, gguf_file: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The model's shape from its config alone (no weights; a GGUF file's header)."""
    from transformers import AutoConfig

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {model}: no config.json there or in the local Hugging Face cache ({e}); "
                          f"give a model folder or a downloaded hub id") from None
    cfg = getattr(cfg, "text_config", cfg)
    given = _given_fields(model, cfg, gguf_file)
    missing = [f for f in SHAPE_FIELDS if not hasattr(cfg, f) or (given is not None and f not in given)]
    if missing:  # transformers fills a missing field from the class's defaults: an estimate of another model
        raise ConfigError(f"--model {model}: its config does not give {', '.join(missing)}, which the estimate "
                          f"needs; plan knows decoder-only LMs whose config.json states their shape (Llama, Qwen2, "
                          f"Mistral, ...)")
    return ModelShape.from_config(cfg)


SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def _given_fields(model: str, cfg, gguf_file: str | None) -> set[str] | None:
    """The fields the model's own config.json states (None where there is no such file: a GGUF header)."""
    if gguf_file:
        return None
    try:
        raw, _ = type(cfg).get_config_dict(model)
    except (OSError, ValueError):
        return None
    raw = raw.get("text_config", raw)
    return set(raw) | {k for k, v in getattr(cfg, "attribute_map", {}).items() if v in raw}


def lengths_from_cache(cache: str) -> tuple[int, int]:
    """(longest prompt + longer response, longest response) over a cache's pairs."""
    from bso_cache.cache import Cache

    import pyarrow.compute as pc

    from bso_cache import schemas as S

    seq = resp = 0
    for batch in Cache.open(cache, verify=False).iter_batches([S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS]):
        prompt, chosen, rejected = (pc.list_value_length(batch.column(i)) for i in range(3))
        longer = pc.max_element_wise(chosen, rejected)
        seq = max(seq, pc.max(pc.add(prompt, longer)).as_py() or 0)
        resp = max(resp, pc.max(longer).as_py() or 0)
    if seq == 0:
        raise ConfigError(f"--cache {cache}: holds no pair to take lengths from")
    return seq, resp


def plan(model: str, options: PlanOptions, *, gpu_memory: int | None = None, gguf_file: str | None = None,
         trust_remote_code: bool = False) -> dict:
    shape = load_shape(model, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    out = {"model": model, "shape": asdict(shape), "options": asdict(options), **predict(shape, options)}
    if gpu_memory:
        out["gpu_memory"] = gpu_memory
        out["combinations"] = {}
        for name in LEVERS:
            combo = combination(options, name)
            p = predict(shape, combo)
            out["combinations"][name] = {"fits": p["peak_bytes"] <= gpu_memory, "peak_bytes": p["peak_bytes"],
                                         "largest_batch": largest_batch(shape, combo, gpu_memory)}
    return out


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '24G', '512MiB' -> bytes. A size has a unit (a bare 24 would be 24 bytes)
    and is positive."""
    t = text.strip().lower().replace(" ", "")
    units = {"gib": GIB, "gb": 10**9, "g": GIB, "mib": 1 << 20, "mb": 10**6, "m": 1 << 20, "tib": 1 << 40}
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            try:
                value = float(t[: -len(u)])
            except ValueError:
                break
            if not value > 0:
                raise ConfigError(f"--gpu-memory {text}: a memory size must be positive, such as 24GiB")
            return int(value * units[u])
    raise ConfigError(f"--gpu-memory {text}: give a size with its unit, such as 24GiB, 80GB or 512MiB (a bare "
                      f"number would be bytes)")

