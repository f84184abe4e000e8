"""Model cards: a README.md in the Hugging Face Hub's format in every model folder `train` saves
(the final model or merged LoRA model, and the LoRA adapter), and a sweep's summary table.

YAML front matter (base_model where it is a hub id, library_name, tags, datasets where the cache
came from the Hub), then the method and loss with its parameters, the cache's identity and row
counts, the training options, the final and held-out metrics, how to load the folder and the BSO
citation. The folder is then ready for `hf upload`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from bso_cache.config import TrainConfig, names, section_names

TAGS = ["bso", "bso-cache", "dpo", "safety-alignment", "preference-optimization"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CITATION = """@article{bso2026,
  title   = {Bregman Safety Optimization},
  journal = {arXiv preprint arXiv:2605.12339},
  year    = {2026}
}"""
LOSS_KEYS = section_names(TrainConfig, "loss")  # those the run's resolved loss holds are shown
TRAIN_KEYS = names(TrainConfig, card=True)      # the options with card=True (config/train.py)
METRIC_KEYS = ("loss", "preference_accuracy", "safety_accuracy", "mean_margin", "reward_margin")


def _hub_id(name) -> str | None:
    return name if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists() else None


def _yaml_list(key: str, values: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values] if values else []


def _table(rows: dict) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in rows.items()]


def model_card(run_config: dict, summary: dict, manifest: dict, *, adapter: bool = False) -> str:
    """The README.md of a model folder a run saved (`adapter`: the LoRA adapter folder)."""
    cfg, loss = run_config.get("config", {}), run_config.get("loss", {})
    base = run_config.get("policy")
    hub_base = _hub_id(base)
    dataset = _hub_id((manifest.get("input") or {}).get("hf_name"))
    front = ["---", *([f"base_model: {json.dumps(hub_base)}"] if hub_base else []),
             f"library_name: {'peft' if adapter else 'transformers'}", *_yaml_list("tags", TAGS),
             *_yaml_list("datasets", [dataset] if dataset else []), "---"]
    rows = manifest.get("rows") or {}
    final, held_out = summary.get("final") or {}, summary.get("eval") or {}
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained(\"PATH\")"
            if adapter else "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(\"PATH\")\ntokenizer = AutoTokenizer.from_pretrained(\"PATH\")")
    body = [f"# {'LoRA adapter' if adapter else 'Model'} trained with BSO (bso-cache)", "",
            f"Fine-tuned from `{base}` with Bregman Safety Optimization (BSO), a family of single-stage "
            f"preference losses that contains DPO and SafeDPO, by bso-cache: "
            f"the reference model's log-probs came from a cache built once, so training held the policy alone.", "",
            "## Loss", "", *_table({k: loss.get(k) for k in LOSS_KEYS if k in loss}), "",
            "## Cache", "", *_table({"reference": (manifest.get("reference") or {}).get("name_or_path"),
                                      "data": (manifest.get("input") or {}).get("spec"),
                                      "manifest digest": manifest.get("digest"),
                                      "rows in / written": f"{rows.get('input')} / {rows.get('written')}",
                                      "dropped": rows.get("dropped")}), "",
            "## Training", "", *_table({k: cfg.get(k) for k in TRAIN_KEYS if k in cfg}),
            f"\n{summary.get('steps')} steps ({summary.get('stopped_by')}).", "",
            "## Results", "", "Training, the last logged step:", "",
            *_table({k: final.get(k) for k in METRIC_KEYS if k in final})]
    if held_out:
        body += ["", "Held-out cache (implicit rewards against its reference):", "",
                 *_table({k: held_out.get(k) for k in METRIC_KEYS + ("pairs",) if k in held_out})]
    body += ["", "## How to load", "", "```python", load, "```", "", "## Citation", "", "```bibtex", CITATION, "```"]
    return "\n".join(front + [""] + body) + "\n"


def write_cards(layout, summary: dict, manifest_file: Path) -> list[str]:
    """README.md in the run's model folder (and its adapter folder); returns the names written at the top."""
    run_config = json.loads(layout.run_config.read_text())
    manifest = json.loads(Path(manifest_file).read_text())
    (layout.root / "README.md").write_text(model_card(run_config, summary, manifest))
    if layout.adapter.is_dir():
        (layout.adapter / "README.md").write_text(model_card(run_config, summary, manifest, adapter=True))
    return ["README.md"]


def sweep_card(rows: list[dict], recommendation: tuple[str | None, str] = (None, "")) -> str:
    """A sweep folder's README.md: the run to take and why, then one line per run."""
    if not rows:
        return "# bso-cache sweep\n\nNo runs.\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    best, why = recommendation
    counts = {s: sum(r.get("status") == s for r in rows) for s in ("finished", "stopped_early", "failed")}
    status = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n)
    take = f"**Take `{best}`**: {why}." if best else f"No run recommended: {why}."
    lines = ["# bso-cache sweep", "", f"{len(rows)} runs from one cache ({status}; `summary.csv` holds the same).",
             "", take, "",
             "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else (f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]))
                                       for k in keys) + " |")
    return "\n".join(lines) + "\n"
