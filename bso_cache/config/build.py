"""`bso-cache build`'s configuration: every option, its default and its help, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from bso_cache.errors import ConfigError
from bso_cache.config.choices import (ATTN_HELP, DEFAULT_MAX_LENGTH, DEFAULT_PREFIX_SHARING, DEFAULT_ROWS_PER_SHARD,
                                      DEVICE_HELP, GGUF_HELP, PREFIX_SHARING_HELP, PROGRESS_HELP, REMOTE_CODE_HELP,
                                      Attention, DType, Format, Overlong, PrefixSharing, TemplateMode)
from bso_cache.config.fields import check_choices, option


@dataclass(frozen=True)
class BuildConfig:
    model: str = option(help="Reference model: local folder or hub id (in the local HF cache).", short="-m")
    data: str = option(help="Input: JSONL/JSON/Parquet/CSV file or folder, a save_to_disk folder, or a HF dataset "
                            "name.", short="-d")
    out: str = option(help="Cache folder to write (resumed if unfinished).", short="-o", path=True)
    split: str = option("train", "Split of a Hugging Face dataset.")
    hf_config: str | None = option(None, "Configuration name of a HF dataset.")
    format: Format = option("auto", "Input format: auto | pku | hh | generic | implicit (TRL's implicit prompt: "
                                    "chosen/rejected conversations sharing their first turns; auto: from the first row).")
    gguf_file: str | None = option(None, GGUF_HELP)
    template: TemplateMode = option("auto", "Prompt rendering: auto (chat template if the tokenizer has one) | chat | "
                                            "plain ('Human: ...\\n\\nAssistant:').")
    chat_template: str | None = option(None, "Jinja chat template file overriding the tokenizer's.", path=True)
    system_prompt: str | None = option(None, "System message added to every conversation that has none (a row's own "
                                             "system message is kept; the manifest notes count both).")
    max_length: int | None = option(None, f"Max tokens of prompt + the longer response [default: "
                                          f"min({DEFAULT_MAX_LENGTH}, model positions)].")
    overlong: Overlong = option("drop", "Pairs over --max-length: drop (counted) | truncate (responses cut).")
    batch_size: int = option(8, "Pairs per reference forward (length-bucketed).")
    rows_per_shard: int | None = option(None, f"Input rows per Parquet shard, the unit of resume and of torchrun "
                                              f"ranks [default: {DEFAULT_ROWS_PER_SHARD}, or the input's rows when "
                                              f"fewer, whatever the number of ranks; build memory is bounded by it].")
    dtype: DType = option("float32", "Reference dtype: float32 | bfloat16 | float16 (log-softmax is float32 "
                                     "regardless).")
    load_in_4bit: bool = option(False, "The reference's linear layers in 4-bit NF4 (bitsandbytes), computing in "
                                       "--dtype: the cache for a QLoRA run (train --load-in-4bit), whose reference "
                                       "is its 4-bit base. Needs pip install 'bso-cache[qlora]'.")
    device: str = option("auto", DEVICE_HELP)
    prefix_sharing: PrefixSharing = option(DEFAULT_PREFIX_SHARING, PREFIX_SHARING_HELP)
    attn_implementation: Attention = option("auto", ATTN_HELP)
    skip_bad_rows: bool = option(False, "Count malformed rows as dropped (with the reason) instead of stopping.")
    overwrite: bool = option(False, "Discard an existing cache in --out made with other settings.")
    trust_remote_code: bool = option(False, REMOTE_CODE_HELP)
    progress: bool = option(True, PROGRESS_HELP)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Values only (the packages, the device and torchrun: preflight.check_build)."""
        check_choices(self)
        for name in ("batch_size", "rows_per_shard"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError("--max-length must be >= 2")
        if self.load_in_4bit and self.gguf_file:
            raise ConfigError(GGUF_4BIT)


GGUF_4BIT = ("--load-in-4bit quantizes safetensors weights with bitsandbytes; a GGUF file is de-quantized on load "
             "and is not supported with it: convert the model to safetensors, or drop --load-in-4bit")
