"""The memory levers of `train`: bf16 weights that learn (stochastic rounding), low-bit optimizer
states, the optimizer in the backward pass, CPU offload, and their refusals."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bso_cache.config import TrainConfig
from bso_cache.errors import ConfigError
from bso_cache.training.optim import ParamwiseOptimizer, make_optimizer, stochastic_round

from .conftest import read_jsonl, train_run

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def weights(path):
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * 0.05
    x[:8] = x[:8].to(dtype).float()  # exactly representable: left as they are
    draws = torch.stack([stochastic_round(x, dtype, g) for _ in range(4000)])  # (4000, 64)
    assert draws.dtype == dtype
    assert torch.equal(draws[:, :8], x[:8].to(dtype).expand(4000, 8))
    nearest = x.to(dtype)
    lo = torch.where(nearest.float() <= x, nearest, torch.nextafter(nearest, torch.full_like(nearest, -1.0)))
    hi = torch.where(nearest.float() <= x, torch.nextafter(nearest, torch.full_like(nearest, 1.0)), nearest)
    assert ((draws == lo) | (draws == hi)).all()
    ulp = (hi.float() - lo.float())
    mean = draws.float().mean(0)
    # the mean of 4000 draws of a two-point variable within 5 standard errors of x
    assert ((mean - x).abs() <= 5 * ulp / (2 * 4000 ** 0.5) + 1e-12).all()
    assert not torch.equal(mean[8:], nearest[8:].float())  # not round-to-nearest


def test_an_update_far_below_half_an_ulp_moves_bf16_weights_in_expectation():
    """RMSprop at lr 1e-6 moves a weight of ~0.08 by ~1e-5, a fiftieth of a bf16 ulp (4.9e-4):
    torch's optimizer on bf16 weights rounds it away; ours moves the mean by the update."""
    n = 200_000
    w0 = torch.full((n,), 0.08)
    grad = torch.full((n,), 1.0)
    plain = torch.nn.Parameter(w0.to(torch.bfloat16))
    plain.grad = grad.to(torch.bfloat16)
    torch.optim.RMSprop([plain], lr=1e-6).step()
    assert torch.equal(plain.detach(), w0.to(torch.bfloat16))  # the vanishing update
    ours = torch.nn.Parameter(w0.to(torch.bfloat16))
    ours.grad = grad.to(torch.bfloat16)
    ParamwiseOptimizer([ours], lambda ps: torch.optim.RMSprop(ps, lr=1e-6), lr=1e-6, offload=False,
                       in_backward=False, seed=0).step()
    exact = torch.nn.Parameter(w0.clone())
    exact.grad = grad.clone()
    torch.optim.RMSprop([exact], lr=1e-6).step()
    want = float((exact.detach() - w0).mean())  # -1e-5
    got = float((ours.detach().float() - w0.to(torch.bfloat16).float()).mean())
    assert want == pytest.approx(-1e-5, rel=1e-3)
    ulp, p = 2.0 ** -11, 1e-5 / 2.0 ** -11  # bf16 spacing at 0.08; chance of a step down
    assert got == pytest.approx(want, abs=5 * ulp * (p * (1 - p) / n) ** 0.5)  # 5 standard errors


def _displacement_ratio(demo_cache, tmp_path, **kw):
    """How far bf16 training moved the weights along the float32 run's direction:
    <dw_bf16, dw_f32> / |dw_f32|^2 (1 = the same update; 0 = the update vanished)."""
    base = dict(generator="logistic", safety_penalty=0.0, pairs="none", lr=1e-6, batch_size=8, max_steps=4,
                shuffle=False, optimizer="rmsprop")
    train_run(demo_cache, tmp_path / "f32", **base)
    train_run(demo_cache, tmp_path / "bf16", **base, dtype="bfloat16", **kw)
    from safetensors.torch import load_file

    from bso_cache.cache import Cache
    from bso_cache.models import locate_reference

    ref_dir = locate_reference(Cache.open(demo_cache).manifest.reference)
    w0 = {k: v.float() for k, v in load_file(f"{ref_dir}/model.safetensors").items()}
    a, b = weights(tmp_path / "f32"), weights(tmp_path / "bf16")
    dot = norm = 0.0
    for k in w0:
        d32 = a[k] - w0[k]
        d16 = b[k] - w0[k].to(torch.bfloat16).float()
        dot += float((d16 * d32).sum())
        norm += float((d32 * d32).sum())
    return dot / norm


def test_bf16_training_moves_the_weights_as_float32_does(demo_cache, tmp_path):
    """The default mechanism (stochastic rounding of each update): the bf16 run's displacement along
    the float32 run's is near 1. Round-to-nearest (the old behaviour) gives a small fraction."""
    ratio = _displacement_ratio(demo_cache, tmp_path)
    assert 0.7 < ratio < 1.3, ratio


def test_bf16_with_round_to_nearest_would_fail_the_same_check(demo_cache, tmp_path, monkeypatch):
    """The check above fails when the update is rounded to nearest (what torch does on bf16 weights)."""
    import bso_cache.training.optim as optim

    monkeypatch.setattr(optim, "stochastic_round", lambda x, dtype, generator: x.to(dtype))
    ratio = _displacement_ratio(demo_cache, tmp_path)
    assert ratio < 0.5, ratio


@needs_bnb
@pytest.mark.parametrize("optimizer", ["rmsprop8bit", "adamw8bit"])
def test_8bit_states_resume_exactly_with_bf16_weights(demo_cache, tmp_path, optimizer):
    """bitsandbytes' 8-bit states with bf16 weights: the weights move, and a run resumed from its
    step-3 checkpoint ends with the same weights, bit for bit (8-bit state, scheduler and the
    rounding generator all restored)."""
    kw = dict(generator="sba", optimizer=optimizer, lr=1e-4, batch_size=8, max_steps=6, save_every=3,
              dtype="bfloat16", warmup_ratio=0.2)
    train_run(demo_cache, tmp_path / "full", **kw)
    train_run(demo_cache, tmp_path / "part", **kw)
    part = tmp_path / "part"
    for f in ("model.safetensors", "summary.json"):
        (part / f).unlink()
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-00000003"]
    train_run(demo_cache, part, **kw, resume=True)
    a, b = weights(tmp_path / "full"), weights(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = torch.load(part / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=True)

    def tensors(x):
        if isinstance(x, torch.Tensor):
            yield x
        elif isinstance(x, dict):
            yield from (t for v in x.values() for t in tensors(v))
        elif isinstance(x, (list, tuple)):
            yield from (t for v in x for t in tensors(v))

    found = [t for t in tensors(state["optimizer"]["inner"]) if t.dtype == torch.uint8]
    assert sum(t.numel() for t in found) > 8192  # the states really are 8-bit


def test_optimizer_in_backward_equals_the_step_after_backward(demo_cache, tmp_path):
    """Each parameter updated as its gradient arrives (and the gradient freed) gives the weights
    of the ordinary step, and logs the same gradient norm."""
    kw = dict(generator="sba", optimizer="adamw", lr=1e-3, batch_size=8, max_steps=3, grad_clip=0.0)
    train_run(demo_cache, tmp_path / "plain", **kw)
    train_run(demo_cache, tmp_path / "iib", **kw, optimizer_in_backward=True)
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "iib")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k
    ra, rb = read_jsonl(tmp_path / "plain" / "metrics.jsonl"), read_jsonl(tmp_path / "iib" / "metrics.jsonl")
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-6)
    assert [r["grad_norm"] for r in ra] == pytest.approx([r["grad_norm"] for r in rb], rel=1e-5)


def test_optimizer_in_backward_frees_each_gradient():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    before = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(cache="-", out="-", optimizer="sgd", lr=0.1, grad_clip=0.0, optimizer_in_backward=True)
    opt = make_optimizer(cfg, list(model.parameters()))
    seen = []
    for p in model.parameters():  # registered after ours: sees the parameter once it has been stepped
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is None))
    model(torch.randn(4, 8)).sum().backward()
    assert seen == [True] * 4
    assert all(p.grad is None for p in model.parameters())
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert opt.grad_sq > 0


@pytest.mark.parametrize("kw, message", [
    (dict(optimizer_in_backward=True), "cannot clip it: pass --grad-clip 0"),
    (dict(optimizer_in_backward=True, grad_clip=0.0, grad_accum=2, batch_size=8), "--grad-accum 1"),
    (dict(fsdp=True, optimizer="rmsprop8bit"), "--fsdp runs the plain optimizers"),
    (dict(fsdp=True, dtype="bfloat16"), "--fsdp runs the plain optimizers"),
    (dict(optimizer="adam8bit"), "valid: adamw, rmsprop, sgd, adamw8bit, rmsprop8bit, adamw4bit"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(cache="-", out="-", **kw)


def test_offload_on_the_cpu_is_refused_before_any_model_loads(demo_cache, tmp_path, model_loads):
    with pytest.raises(ConfigError, match="--optimizer-offload.*already there"):
        train_run(demo_cache, tmp_path / "r", optimizer_offload=True, device="cpu")
    assert model_loads == []


def test_a_missing_low_bit_library_is_one_line_naming_the_extra(demo_cache, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the `bitsandbytes` package: pip install 'bso-cache\[lowbit\]'"):
        train_run(demo_cache, tmp_path / "r", optimizer="rmsprop8bit")


def test_offload_path_steps_on_the_cpu_state_device(monkeypatch):
    """The offload mechanism (state and update on the CPU, weights where they are) on CPU weights,
    in float32 working slices of 128 elements: the same update as the in-place step on the whole."""
    import bso_cache.training.optim as optim

    monkeypatch.setattr(optim, "SLICE", 128)
    torch.manual_seed(0)
    w = torch.randn(300) * 0.1
    g = torch.randn(300)
    a = torch.nn.Parameter(w.clone())
    a.grad = g.clone()
    opt = ParamwiseOptimizer([a], lambda ps: torch.optim.AdamW(ps, lr=1e-2), lr=1e-2, offload=True,
                             in_backward=False, seed=0)
    assert len(opt._work) == 3 and opt._work[0] is not a  # CPU working slices, not the parameter itself
    opt.step()
    b = torch.nn.Parameter(w.clone())
    b.grad = g.clone()
    torch.optim.AdamW([b], lr=1e-2).step()
    assert torch.allclose(a.detach(), b.detach(), rtol=1e-6, atol=1e-8)
    assert all(w.numel() == 0 for w in opt._work)  # the working copies are freed after the step


@needs_bnb
def test_8bit_state_is_the_same_in_slices(monkeypatch):
    """bitsandbytes' block-wise 8-bit state quantizes blocks of the flattened tensor: slices on a
    multiple of the block give the same update as the whole tensor."""
    import bitsandbytes as bnb

    import bso_cache.training.optim as optim

    monkeypatch.setattr(optim, "SLICE", 8192)
    torch.manual_seed(0)
    w, g = torch.randn(6, 4096) * 0.1, torch.randn(6, 4096)
    whole = torch.nn.Parameter(w.clone())
    sliced = torch.nn.Parameter(w.clone())
    a = bnb.optim.RMSprop8bit([whole], lr=1e-3)
    b = ParamwiseOptimizer([sliced], lambda ps: bnb.optim.RMSprop8bit(ps, lr=1e-3), lr=1e-3, offload=True,
                           in_backward=False, seed=0)
    assert len(b._work) == 3
    for k in range(3):
        whole.grad, sliced.grad = (g * (k + 1)).clone(), (g * (k + 1)).clone()
        a.step()
        b.step()
    assert torch.equal(whole.detach(), sliced.detach())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_adamw4bit_trains_with_bf16_weights(demo_cache, tmp_path):
    train_run(demo_cache, tmp_path / "r", optimizer="adamw4bit", lr=1e-4, batch_size=8, max_steps=2, dtype="bfloat16")
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_converting_load_equals_from_pretrained(demo_assets, dtype, tmp_path):
    """A float32 checkpoint loaded as bf16/fp16 tensor by tensor (one stored tensor on the host at a
    time) is the model `from_pretrained(dtype=...)` gives: same tensors, ties, outputs, eval mode.
    Every tensor of the checkpoint is moved off its initial value, so none can pass unread."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bso_cache.models import _load_converting, load_model

    model = AutoModelForCausalLM.from_pretrained(str(demo_assets["model"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "m"))
    AutoTokenizer.from_pretrained(str(demo_assets["model"])).save_pretrained(str(tmp_path / "m"))
    path = str(tmp_path / "m")
    ours = load_model(path, dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 50, (2, 12))
    assert torch.equal(ours(x).logits, theirs(x).logits)
    assert not ours.training and ours.config.name_or_path == path
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == \
        (theirs.get_output_embeddings().weight is theirs.get_input_embeddings().weight)
    # the same dtype as stored: from_pretrained's zero-copy mapping is the right path
    assert _load_converting(path, dtype="float32", device="cpu", trust_remote_code=False,
                            attn_implementation=None) is None


def test_the_allocator_policy_is_set_unless_the_user_set_one(monkeypatch):
    import sys

    from bso_cache.io.allocator import return_freed_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    for k in [k for k in __import__("os").environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    assert return_freed_memory() is True
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert return_freed_memory() is False


def test_optimizer_in_backward_lets_go_of_the_model():
    """The backward-pass hooks must not keep the optimizer (and through it the model and its states)
    alive: torch does not show a hook's references to the garbage collector, so a cycle through a
    hook is never collected. On the H200 each in-backward row of gpu_check kept its 0.5B model and
    AdamW states (~4.7 GB) allocated into the rows after it; a sweep would do the same per run."""
    import gc
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)).to(torch.bfloat16)
    cfg = TrainConfig(cache="-", out="-", optimizer="adamw", lr=0.1, grad_clip=0.0, optimizer_in_backward=True)
    opt = make_optimizer(cfg, list(model.parameters()))
    model(torch.randn(4, 8, dtype=torch.bfloat16)).sum().backward()
    assert opt.grad_sq > 0  # the hooks ran
    gone = weakref.ref(model), weakref.ref(opt)
    del model, opt
    gc.collect()
    assert [r() for r in gone] == [None, None]


@pytest.mark.parametrize("kw", [dict(), dict(dtype="bfloat16"),
                                dict(dtype="bfloat16", optimizer_in_backward=True, grad_clip=0.0,
                                     gradient_checkpointing=True),
                                pytest.param(dict(dtype="bfloat16", optimizer="rmsprop8bit"), marks=needs_bnb),
                                dict(dtype="bfloat16", lora_r=4)],
                         ids=["float32", "bf16", "bf16-inbackward-ckpt", "bf16-rmsprop8bit", "lora-bf16"])
def test_a_finished_trainer_frees_its_model_and_optimizer(demo_cache, tmp_path, kw):
    """Runs in one process one after another (a sweep, gpu_check's rows, the Python API) each start
    from nothing: once a Trainer is dropped, no parameter of its model is alive."""
    import gc
    import weakref

    from bso_cache.training.train import Trainer

    cfg = TrainConfig(cache=str(demo_cache), out=str(tmp_path / "run"), progress=False, max_steps=1, batch_size=4, **kw)
    trainer = Trainer(cfg, log=lambda s: None)
    trainer.run()
    model = trainer.model
    # the run is over: a backward through the model it leaves behind updates nothing, frees nothing
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    if logits.requires_grad:  # (a LoRA run's adapters are merged into the weights it saved)
        logits.float().sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    gone = [weakref.ref(p) for p in model.parameters()] + [weakref.ref(trainer.optimizer)]
    del model, logits
    del trainer
    gc.collect()
    assert sum(r() is not None for r in gone) == 0


def test_optimizer_in_backward_makes_no_float32_copy_of_a_whole_gradient(monkeypatch):
    """The hook sums the gradient's squares (for the logged norm) a slice at a time, as it updates:
    `grad.float().pow(2).sum()` made two float32 copies of each whole gradient, 392 MiB at the
    bench's 50k x 1024 bf16 embedding, beside the activations (the frugal row's peak: 1,325 -> 1,031
    MiB above the runtime, docs/PERFORMANCE.md)."""
    import bso_cache.training.optim as optim

    from .conftest import largest_float32_made

    monkeypatch.setattr(optim, "SLICE", 1000)
    torch.manual_seed(0)
    model = torch.nn.Linear(200, 64, bias=False).to(torch.bfloat16)  # a 12,800-element weight: 13 slices
    cfg = TrainConfig(cache="-", out="-", optimizer="adamw", lr=1e-3, grad_clip=0.0, optimizer_in_backward=True)
    opt = make_optimizer(cfg, list(model.parameters()))
    x = torch.randn(2, 200, dtype=torch.bfloat16)
    expect = float((torch.ones(2, 64, dtype=torch.bfloat16).t() @ x).float().pow(2).sum())
    with largest_float32_made() as seen:
        model(x).sum().backward()
    assert 0 < seen.largest <= 1000
    assert opt.grad_sq == pytest.approx(expect, rel=1e-6)


def test_memory_levers_on_the_cpu_also_get_the_frugal_heap_policy(demo_cache, tmp_path):
    """`train --gradient-checkpointing` / `--optimizer-in-backward` on the CPU fix glibc's mmap
    threshold at 128 KiB and say so in one line; a MALLOC_* setting of the user's rules instead;
    a run without those levers keeps the 4 MiB default, silently."""
    import sys

    from .conftest import ENV, cli

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    env = {k: v for k, v in ENV.items() if not k.startswith("MALLOC_")}
    base = ["train", "-c", demo_cache, "--max-steps", "1", "--batch-size", "4", "--no-progress"]
    note = "trade time for memory, and so does the C heap now"
    proc = cli(*base, "-o", tmp_path / "a", "--gradient-checkpointing", env=env)
    assert f"note: --gradient-checkpointing {note}" in proc.stderr + proc.stdout
    proc = cli(*base, "-o", tmp_path / "b", "--gradient-checkpointing", env={**env, "MALLOC_ARENA_MAX": "2"})
    assert note not in proc.stderr + proc.stdout
    proc = cli(*base, "-o", tmp_path / "c", env=env)
    assert note not in proc.stderr + proc.stdout
