"""scripts/gpu_check.sh runs on the CPU with a tiny config, from a bare checkout, without polars or datasets
(the GPU machine has neither); and GPU-only checks that skip without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BARE = """
import sys, runpy
# like the GPU image: no polars, no datasets, and bso_cache not installed (a bare checkout)
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("polars", "datasets", "bitsandbytes"):
            raise ImportError("blocked " + name)
        return None
sys.meta_path[:] = [f for f in sys.meta_path if "Editable" not in getattr(f, "__name__", type(f).__name__)]
sys.meta_path.insert(0, Block())
sys.argv = ["gpu_check.py", sys.argv[1], "--tiny", "--device", "cpu"]
runpy.run_path("scripts/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_runs_tiny_on_cpu_from_a_bare_checkout(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", BARE, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["errors"] == {} and res["skipped"] == {}
    for key in ("unshared_w64", "unshared_w1", "shared_sdpa", "packed_sdpa", "unshared_flex", "shared_flex",
                "packed_flex", "plain_forward"):
        assert res["build"][key]["pairs_per_s"] > 0, key
    # every layout equals unshared SDPA on this device (flex: values only, it has no CPU backward)
    for key, row in res["exactness"].items():
        assert row["max_abs_seq_diff"] <= 2e-4, key
        assert (row["grad_rel_diff"] is None) == key.endswith("flex"), key
    train = res["train"]
    assert train["shared_sdpa"]["prefix_sharing"] and train["unshared"]["prefix_sharing"] is False
    assert train["shared_flex"]["skipped"] == "CUDA only" and train["bf16_offload_inbwd_ckpt"]["skipped"] == "CUDA only"
    # a lever whose library is missing is a row saying so, never left out (bitsandbytes is blocked above)
    assert train["bf16_adamw8bit"]["skipped"] == "bitsandbytes is not installed here"
    assert train["qlora"]["skipped"].startswith("bitsandbytes")
    for key in ("unshared", "bf16", "bf16_inbwd", "ckpt", "reference_online", "policy_only"):
        assert train[key]["step_seconds"] > 0, key
    # each row starts from what the first one started from: nothing an earlier row allocated is still
    # held (on the H200 the in-backward rows' hooks once kept each model and its states into the next rows)
    held = {k: v["held_before_mib"] for k, v in train.items() if "held_before_mib" in v}
    assert len(held) >= 8 and max(held.values()) - held["unshared"] < 0.25, held
    # trl is checked before datasets (blocked above); CI installs the test extra only, so trl may be absent too
    import importlib.util
    first_missing = "trl" if importlib.util.find_spec("trl") is None else "datasets"
    assert train["trl"]["skipped"] == f"{first_missing} is not installed here"
    assert res["rule"]["attention"] in ("sdpa", "flex_attention")
    # runs sharing one device: each the same run as alone (what a sweep's --gpus-per-run 1/N does)
    concurrent = res["concurrent"]
    assert concurrent["runs"] == 2 and concurrent["same_losses"] and concurrent["throughput_ratio"] > 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| shared + packed, FlexAttention block mask |" in text and "| bf16 + 8-bit AdamW | skipped" in text
    assert "Rule outcome" in text and "Sharing one device" in text


@pytest.mark.gpu
def test_cuda_scoring_matches_cpu(demo_assets):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import AutoModelForCausalLM

    from bso_cache.scoring.layouts import make_token_batch
    from bso_cache.scoring.scorer import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"])).eval()
    batch = make_token_batch([[1, 5, 6], [1, 7]], [[8, 9, 10], [11, 12, 13, 14]])
    with torch.no_grad():
        cpu = sequence_logps(model, batch)
        gpu = sequence_logps(model.cuda(), batch.to("cuda")).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-3)
