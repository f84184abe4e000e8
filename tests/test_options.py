"""Memory/speed options: LoRA (PEFT), gradient checkpointing, bf16 autocast, grad accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from bso_cache.config import TrainConfig

from .conftest import read_jsonl, train_run


def test_lora_trains_adapters_only_and_saves_merged_model(demo_cache, demo_assets, tmp_path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    train_run(demo_cache, tmp_path / "r", lora_r=4, lora_alpha=8, optimizer="adamw", lr=1e-2, max_steps=4, batch_size=8,
        generator="logistic", safety_penalty=0.0, pairs="none", save_every=2)
    assert (tmp_path / "r" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "r"))
    base = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]))
    b = dict(base.named_parameters())
    moved = [n for n, p in merged.named_parameters() if not torch.equal(p, b[n])]
    assert moved and all("proj" in n for n in moved)  # attention/MLP projections; embeddings and head frozen
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA B = 0: the policy starts at the reference
    adapter = load_file(str(tmp_path / "r" / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora" in k for k in adapter)


def _saved_activation_mib(model) -> float:
    """Bytes autograd keeps for the backward of one forward (distinct tensors), in MiB."""
    seen, total = set(), [0]

    def pack(t):
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.float().mean().backward()
    return total[0] / 2**20


def test_lora_on_bf16_weights_keeps_bf16_adapters_saves_less_and_learns(demo_cache, tmp_path):
    """peft makes bf16 adapters float32 by default, and every adapted layer then keeps a float32
    copy of its input for the backward; bso-cache keeps adapters in the weights' dtype (they learn
    through stochastic rounding)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from bso_cache.models import add_lora

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=4)).to(torch.bfloat16)

    cfg = TrainConfig(cache="-", out="-", lora_r=8, dtype="bfloat16")
    ours = add_lora(cfg, base())
    assert {p.dtype for p in ours.parameters() if p.requires_grad} == {torch.bfloat16}
    peft_default = get_peft_model(base(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
    assert _saved_activation_mib(ours) < 0.8 * _saved_activation_mib(peft_default)
    train_run(demo_cache, tmp_path / "r", lora_r=8, dtype="bfloat16", optimizer="adamw", lr=1e-2, max_steps=8,
        batch_size=8, generator="logistic", safety_penalty=0.0, pairs="none", shuffle=False)
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, [r["loss"] for r in rows]
    adapter = load_file(str(tmp_path / "r" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}


def test_gradient_checkpointing_and_accumulation_give_the_same_update(demo_cache, tmp_path):
    from safetensors.torch import load_file

    base = dict(generator="sba", optimizer="sgd", lr=1e-2, max_steps=2, batch_size=8, lr_schedule="constant",
                warmup_ratio=0.0)
    train_run(demo_cache, tmp_path / "a", **base)
    train_run(demo_cache, tmp_path / "b", gradient_checkpointing=True, **base)
    train_run(demo_cache, tmp_path / "c", grad_accum=2, **base)
    a, b, c = (load_file(str(tmp_path / x / "model.safetensors")) for x in "abc")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
        assert torch.allclose(a[k], c[k], atol=1e-5), k


def test_bf16_autocast_runs_and_step0_uses_the_looser_tolerance(demo_cache, tmp_path):
    summary = train_run(demo_cache, tmp_path / "r", autocast="bf16", max_steps=2, batch_size=8)
    assert summary["step0"]["tolerance_per_token"] == 0.05 and summary["step0"]["max_per_token"] < 0.05
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_tensorboard_logging(demo_cache, tmp_path):
    pytest.importorskip("tensorboard")
    train_run(demo_cache, tmp_path / "r", tensorboard=True, max_steps=2, batch_size=8)
    assert list((tmp_path / "r" / "tensorboard").glob("events.out.tfevents.*"))


def test_bf16_cache_with_float32_policy_passes_step0(demo_assets, tmp_path):
    """The authors' setup: reference pass in half precision, policy in float32."""
    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig

    build_cache(BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]), out=str(tmp_path / "c"),
                            max_length=128, dtype="bfloat16", progress=False), log=lambda s: None)
    summary = train_run(tmp_path / "c", tmp_path / "r", max_steps=1, batch_size=8)
    step0 = summary["step0"]
    assert step0["policy_is_reference"] and step0["tolerance_per_token"] == 0.05
    assert 0 < step0["max_per_token"] < 0.05
    # bf16 end to end: a bf16 policy on the bf16 cache passes the same check (other batches than the
    # build's, so the padding and hence the bf16 rounding differ: not 0)
    summary = train_run(tmp_path / "c", tmp_path / "r16", max_steps=1, batch_size=8, dtype="bfloat16")
    step0 = summary["step0"]
    assert step0["policy_is_reference"] and step0["tolerance_per_token"] == 0.05
    assert step0["max_per_token"] < 0.05


def test_every_saved_model_folder_has_a_hub_model_card(demo_cache, tmp_path):
    """README.md with YAML front matter (library, the bso tag), the loss, the cache, the options and
    the final metrics equal to summary.json's, in the model folder and the LoRA adapter folder."""
    import yaml

    from bso_cache.reporting.card import model_card

    pytest.importorskip("peft")
    summary = train_run(demo_cache, tmp_path / "r", max_steps=2, batch_size=4, lora_r=4)
    for folder, library in ((tmp_path / "r", "transformers"), (tmp_path / "r" / "adapter", "peft")):
        text = (folder / "README.md").read_text()
        front = yaml.safe_load(text.split("---")[1])
        assert front["library_name"] == library and "bso" in front["tags"] and "base_model" not in front  # a local path
        assert f"| loss | {summary['final']['loss']} |" in text and "| generator | sba |" in text
        assert "@article{bso2026" in text
    assert "README.md" in summary["files"]
    # a hub id as the starting point becomes base_model; a hub dataset becomes datasets
    card = model_card({"policy": "Qwen/Qwen2.5-0.5B-Instruct", "config": {}, "loss": {}}, {"final": {}},
                      {"input": {"hf_name": "PKU-Alignment/PKU-SafeRLHF"}})
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct" and front["datasets"] == ["PKU-Alignment/PKU-SafeRLHF"]
