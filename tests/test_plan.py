"""`bso-cache plan`: the memory model from a config alone, its components, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from bso_cache.errors import ConfigError
from bso_cache.training.plan import GIB, LEVERS, ModelShape, PlanOptions, largest_batch, parse_bytes, predict

from bso_cache.cli.app import app


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied-gqa", "qwen2"])
def test_parameter_count_from_the_config_equals_the_models(kind):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=8)
    if kind == "qwen2":
        cfg, cls = Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True), Qwen2ForCausalLM
    else:
        cfg = LlamaConfig(**small, num_key_value_heads=8 if kind == "llama-tied" else 2,
                          tie_word_embeddings=kind == "llama-tied")
        cls = LlamaForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    shape = ModelShape.from_config(cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.largest_tensor == max(p.numel() for p in model.parameters())


def _shape_7b() -> ModelShape:
    from transformers import LlamaConfig

    return ModelShape.from_config(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                              num_hidden_layers=32, num_attention_heads=32))


def test_components_follow_the_bytes_per_parameter_of_each_lever():
    shape = _shape_7b()
    o = PlanOptions(micro_batch=1, seq_length=512, response_tokens=256)
    fp32 = predict(shape, o)
    n = shape.params
    assert 6.7e9 < n < 6.8e9  # Llama-2-7B
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer_state"]) == (4 * n, 4 * n, 4 * n)
    assert predict(shape, replace(o, optimizer="adamw"))["optimizer_state"] == 8 * n
    bf16 = predict(shape, replace(o, dtype="bfloat16", optimizer="rmsprop8bit"))
    assert (bf16["weights"], bf16["gradients"], bf16["optimizer_state"]) == (2 * n, 2 * n, n)
    from bso_cache.training.optim import SLICE

    assert bf16["update"] == 14 * SLICE < 8 * shape.largest_tensor  # float32 copies and rounding buffers of one slice
    iib = predict(shape, replace(o, dtype="bfloat16", optimizer_in_backward=True))
    assert iib["gradients"] == 2 * shape.largest_tensor
    # the head's (V, H) weight gradient: beside the activations in the weights' dtype (a bf16 head
    # writes it by vocabulary blocks, no float32 sum); in the backward pass it is the one gradient
    # held, counted once, under gradients
    bf16_head = predict(shape, replace(o, dtype="bfloat16"))["head"]
    assert bf16_head - iib["head"] == 2 * shape.vocab * shape.hidden
    assert fp32["head"] - bf16_head == 2 * shape.vocab * shape.hidden
    off = predict(shape, replace(o, dtype="bfloat16", optimizer_offload=True))
    assert off["optimizer_state"] == 0 and off["offloaded_state_bytes"] == 4 * n
    ckpt = predict(shape, replace(o, gradient_checkpointing=True))
    assert ckpt["activations"] < fp32["activations"] / 5
    lora = predict(shape, replace(o, dtype="bfloat16", lora_r=16))
    assert lora["trainable_params"] < 0.01 * n and lora["optimizer_state"] == 4 * lora["trainable_params"]
    qlora = predict(shape, replace(o, dtype="bfloat16", qlora=True))
    assert qlora["weights"] < 0.35 * lora["weights"]
    assert all(v >= 0 for v in fp32.values())
    fixed = fp32["weights"] + fp32["optimizer_state"] + fp32["runtime"]
    assert fp32["peak_bytes"] == fixed + max(fp32["activations"] + fp32["head"], fp32["gradients"] + fp32["update"])
    assert iib["peak_bytes"] == iib["weights"] + iib["optimizer_state"] + iib["runtime"] + iib["activations"] + \
        iib["head"] + iib["gradients"] + iib["update"]


def test_activations_grow_with_the_batch_and_largest_batch_fits():
    shape = _shape_7b()
    o = PlanOptions(dtype="bfloat16", optimizer="rmsprop8bit", optimizer_in_backward=True,
                    gradient_checkpointing=True, seq_length=1024, response_tokens=512)
    budget = 24 * GIB
    b = largest_batch(shape, o, budget)
    assert b >= 1
    assert predict(shape, replace(o, micro_batch=b))["peak_bytes"] <= budget
    assert predict(shape, replace(o, micro_batch=b + 1))["peak_bytes"] > budget
    assert largest_batch(shape, PlanOptions(seq_length=1024), budget) == 0  # fp32 RMSprop: 12 B/param alone is 80 GB


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * GIB and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512MiB") == 512 << 20
    with pytest.raises(ConfigError, match="give a size with its unit, such as 24GiB"):
        parse_bytes("lots")


def test_cli_reads_only_the_config_and_says_what_fits(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32).save_pretrained(str(tmp_path))  # config.json alone, no weights
    runner = CliRunner()
    res = runner.invoke(app, ["plan", "--model", str(tmp_path), "--max-length", "1024", "--batch-size", "1",
                              "--dtype", "bfloat16", "--gpu-memory", "24GiB", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["peak_bytes"] == out["weights"] + out["optimizer_state"] + out["runtime"] + max(
        out["activations"] + out["head"], out["gradients"] + out["update"])
    assert set(out["combinations"]) == set(LEVERS)
    assert not out["combinations"]["fp32 rmsprop"]["fits"]
    assert out["combinations"]["bf16 + 8-bit + in-backward + ckpt"]["fits"]
    text = runner.invoke(app, ["plan", "--model", str(tmp_path), "--gpu-memory", "24GiB"])
    assert text.exit_code == 0 and "largest micro-batch" in text.output and "peak" in text.output
    bad = runner.invoke(app, ["plan", "--model", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "no config.json" in bad.output and "Traceback" not in bad.output


def test_cli_takes_the_lengths_from_a_cache(demo_cache, demo_assets):
    from bso_cache.training.plan import lengths_from_cache

    seq, resp = lengths_from_cache(str(demo_cache))
    assert 0 < resp < seq <= 128
    res = CliRunner().invoke(app, ["plan", "--model", str(demo_assets["model"]), "--cache", str(demo_cache),
                                   "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert (out["options"]["seq_length"], out["options"]["response_tokens"]) == (seq, resp)
    assert out["runtime"] == 0


def test_plan_refuses_nonsense_in_one_line(tmp_path):
    """Sizes without a unit (24 would be 24 bytes) or not positive, lengths that cannot be, and a
    config that leaves out what the estimate needs (transformers would fill it from Llama's defaults)."""
    import json

    for text in ("24", "-1GiB", "0GB", "lots"):
        with pytest.raises(ConfigError, match="--gpu-memory"):
            parse_bytes(text)
    assert parse_bytes("24GiB") == 24 * GIB
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 100,
                                                    "num_attention_heads": 4}))
    runner = CliRunner()
    for args, needle in ((["--gpu-memory", "24"], "give a size with its unit"),
                         (["--max-length", "-3"], "--max-length -3"),
                         (["--max-length", "512", "--response-length", "512"], "--response-length 512")):
        r = runner.invoke(app, ["plan", "--model", str(folder), *args])
        assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = runner.invoke(app, ["plan", "--model", str(folder)])
    assert r.exit_code == 2 and "num_hidden_layers, intermediate_size" in r.stderr, r.stderr
