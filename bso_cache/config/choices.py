"""The allowed values of the options, as Literal types (the fields use them; the command line shows
and checks them) and as tuples, and the defaults that are not a single field's."""

from __future__ import annotations

from typing import Literal, get_args

from bso_cache.losses import ALIASES as _ALIASES, GENERATORS as _GENERATORS

Format = Literal["auto", "pku", "hh", "generic", "implicit"]
TemplateMode = Literal["auto", "chat", "plain"]
Overlong = Literal["drop", "truncate"]
DType = Literal["float32", "bfloat16", "float16"]
PairMode = Literal["none", "safedpo", "drop-both-unsafe"]
Orientation = Literal["better", "safer"]
OptimizerName = Literal["adamw", "rmsprop", "sgd", "adamw8bit", "rmsprop8bit", "adamw4bit"]
Schedule = Literal["cosine", "linear", "constant"]
Autocast = Literal["none", "bf16", "fp16"]
PrefixSharing = Literal["auto", "on", "off"]   # see sharing.py
GeneratorName = Literal[(*_GENERATORS, *_ALIASES)]  # the loss's generator h (losses.GENERATORS)
Attention = Literal["auto", "sdpa", "eager", "flex_attention"]  # transformers' names; see models.resolve_attention

FORMATS, TEMPLATE_MODES, OVERLONG, DTYPES = get_args(Format), get_args(TemplateMode), get_args(Overlong), get_args(DType)
PAIR_MODES, ORIENTATIONS, OPTIMIZERS = get_args(PairMode), get_args(Orientation), get_args(OptimizerName)
SCHEDULES, AUTOCAST, PREFIX_SHARING = get_args(Schedule), get_args(Autocast), get_args(PrefixSharing)
ATTENTION = get_args(Attention)

DEFAULT_PREFIX_SHARING: PrefixSharing = "auto"  # every command's --prefix-sharing default (the rule: sharing.py)
DEFAULT_MAX_LENGTH = 2048        # --max-length when not given: min(this, the model's positions)
DEFAULT_ROWS_PER_SHARD = 2000    # --rows-per-shard when not given (or the input's rows, when fewer)

# help texts shared by several commands' options
PREFIX_SHARING_HELP = ("Score each prompt once for both responses (one sequence prompt+chosen+rejected with a "
                       "block mask): auto (where the estimated cost for this model and data is lower, on the device "
                       "kinds measured: the CPU and CUDA) | on | off. The numbers are the same either way; a model "
                       "whose attention cannot take the mask falls back to off with one printed line.")
ATTN_HELP = ("transformers' attention: auto (the measured best per device: docs/PERFORMANCE.md) | sdpa | eager | "
             "flex_attention (prefix sharing with FlexAttention's block mask; training with it needs a GPU). A "
             "model without FlexAttention support uses sdpa, with one printed line.")
DEVICE_HELP = "auto | cpu | cuda[:N]."
REMOTE_CODE_HELP = "Allow the model's own code from its repository (off unless you trust it)."
CACHE_HELP = "Cache folder (from `bso-cache build`)."
GGUF_HELP = "Load the model from this GGUF file inside --model."
PROGRESS_HELP = "Show a progress bar."
DIGEST_HELP = ("Refuse the cache unless its manifest digest is this (sha256:..., as `bso-cache inspect` prints it): "
               "pin the cache its builder published.")
