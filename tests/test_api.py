"""The Python API: what `bso_cache.__all__` names, as docs/API.md shows it."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import torch

import bso_cache

DOC = Path(__file__).resolve().parents[1] / "docs" / "API.md"


def test_the_public_names_resolve_and_the_doc_lists_each():
    text = DOC.read_text()
    for name in bso_cache.__all__:
        assert getattr(bso_cache, name) is not None
        if name != "__version__":
            assert f"`{name}" in text, name
    import importlib

    module = importlib.import_module("bso_cache.training.train")
    assert bso_cache.train_policy is module.train
    # a public name never shadows a module or a wing of the package
    package = Path(bso_cache.__file__).parent
    assert not set(bso_cache.__all__) & {p.stem for p in package.iterdir() if p.suffix == ".py" or p.is_dir()}


def test_importing_the_package_does_not_import_torch():
    code = "import sys, bso_cache; bso_cache.__all__; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_docs_example_runs_as_written(tmp_path):
    block = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, loss = proc.stdout.split()[-2:]
    assert steps == "2" and math.isfinite(float(loss))


def test_the_dataset_yields_every_kept_pair_with_its_cached_log_probs(demo_cache):
    from bso_cache.data.pairs import count_pairs, epoch_batches

    cache = bso_cache.Cache.open(demo_cache)
    loader = torch.utils.data.DataLoader(bso_cache.CacheDataset(cache, pairs="safedpo"), batch_size=16,
                                         collate_fn=bso_cache.collate_pairs, num_workers=2)
    seen = [(i, c, r) for b in loader for i, c, r in zip(b["source_index"], b["ref_chosen_logps"].tolist(),
                                                           b["ref_rejected_logps"].tolist())]
    expect = [(it.source_index, it.ref_chosen_logp, it.ref_rejected_logp)
              for b in epoch_batches(cache, mode="safedpo", orientation="better", batch_size=10**6, seed=0, epoch=0,
                                     shuffle=False) for it in b]
    assert sorted(seen) == sorted(expect) and len(seen) == count_pairs(cache, "safedpo", "better").kept


def test_dpo_at_step_zero_is_ln2(demo_assets, demo_cache):
    from transformers import AutoModelForCausalLM

    batch = bso_cache.collate_pairs(next(iter(torch.utils.data.DataLoader(
        bso_cache.CacheDataset(demo_cache), batch_size=8, collate_fn=lambda x: x))))
    policy = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]))
    with torch.no_grad():
        lp = bso_cache.score_pairs(policy, batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"])
    losses = bso_cache.bso_loss(lp.chosen, lp.rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"],
                                generator="logistic", safety_penalty=0.0)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-3)
