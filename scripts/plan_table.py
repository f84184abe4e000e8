#!/usr/bin/env python
"""The "what fits" table of docs/PERFORMANCE-MEMORY.md: `bso-cache plan` for 0.5B-8B models on 24 GB and
80 GB GPUs, for each memory lever. Predicted, not measured: the models' configs are written here
from their published shapes (no weights, no network), and `plan` reads them like any config.json.

Usage: python scripts/plan_table.py [--seq 1024 --response 512] [--doc docs/PERFORMANCE-MEMORY.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

# published shapes (config.json of each model on the Hub)
MODELS = {
    "Qwen2.5-0.5B": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen2.5-1.5B": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen2.5-3B": ("qwen2", dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
    "Qwen2.5-7B": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                 num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
    "Llama-3.1-8B": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   tie_word_embeddings=False)),
}
GPUS = {"24 GB": 24 * 10**9, "80 GB": 80 * 10**9}


def main() -> None:
    from transformers import LlamaConfig, Qwen2Config

    from results import record
    from bso_cache.training.plan import LEVERS, PlanOptions, combination, largest_batch, load_shape, predict

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024, help="tokens of prompt + the longer response")
    ap.add_argument("--response", type=int, default=512, help="tokens of the longer response")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "PERFORMANCE-MEMORY.md"))
    args = ap.parse_args()
    base = PlanOptions(seq_length=args.seq, response_tokens=args.response, micro_batch=1, device="cuda")
    shapes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kind, kw) in MODELS.items():
            folder = Path(tmp) / name
            (Qwen2Config if kind == "qwen2" else LlamaConfig)(**kw).save_pretrained(str(folder))
            shapes[name] = load_shape(str(folder))
    lines = ["| lever | " + " | ".join(f"{m} ({shapes[m].params / 1e9:.2f}B)" for m in MODELS) + " |",
             "|---|" + "---|" * len(MODELS)]
    for lever in LEVERS:
        cells = []
        for m in MODELS:
            o = combination(base, lever)
            peak = predict(shapes[m], o)["peak_bytes"] / 10**9
            fits = [f"{g}: {largest_batch(shapes[m], o, b) or 'no'}" for g, b in GPUS.items()]
            cells.append(f"{peak:.1f} GB; " + ", ".join(fits))
        lines.append(f"| {lever} | " + " | ".join(cells) + " |")
    text = (f"### What fits (predicted by `bso-cache plan`, {time.strftime('%Y-%m-%d')})\n\n"
            f"**Predicted, not measured** on these models: `plan`'s CUDA activation calibration is fitted on the "
            f"0.5B model of the first GPU check (\"GPU check\" below), where it came within "
            f"0.89-1.07x of the measured peaks of full fine-tuning, and within 20% of the peaks of checkpointing "
            f"with the optimizer in the backward pass, without and with offload, derived by taking out what earlier "
            f"rows had leaked (not yet measured clean; the head and the in-backward hook have since shed ~0.5 GB "
            f"there, which `plan` already counts). It came to 0.75x of LoRA's, measured with float32 adapters "
            f"since changed: the LoRA and QLoRA rows are lower bounds. "
            f"Each cell: the predicted peak at a micro-batch of "
            f"1 pair of {args.seq} tokens ({args.response} of response), then the largest micro-batch that fits a "
            f"24 GB and an 80 GB GPU (\"no\": not even one pair). CUDA runtime counted as 1 GiB. The model shapes are "
            f"the published configs; `python scripts/plan_table.py` rebuilds this table. The QLoRA row "
            f"(`train --load-in-4bit --lora-r 16`) has not been measured on a GPU yet.\n\n" + "\n".join(lines))
    print(text)
    record("plan-what-fits", args.doc, text)


if __name__ == "__main__":
    main()
