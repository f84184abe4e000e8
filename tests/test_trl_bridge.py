"""TRL's DPOTrainer from a bso-cache cache (bso_cache.integrations.trl), TRL 1.16 on the CPU."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl")


def trl_losses(model_dir, cache, out, *, steps, batch_size, lr, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from bso_cache.integrations.trl import CacheDPOTrainer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=lr,
                     optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                     weight_decay=0.0, beta=0.1, loss_type=["sigmoid"], train_sampling_strategy="sequential",
                     logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True,
                     bf16=False, gradient_checkpointing=False)  # TRL 1.16 defaults: bf16 autocast, checkpointing
    trainer = CacheDPOTrainer(model=model, args=args, cache=cache,
                              processing_class=AutoTokenizer.from_pretrained(str(model_dir)), **kw)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, trainer.reference_forwards, len(forwards), trainer


def test_trl_trains_from_the_cache_with_no_reference_forward_and_equals_bso_cache(demo_assets, demo_cache, tmp_path):
    from bso_cache.config import TrainConfig
    from bso_cache.training.train import train

    steps, batch, lr = 5, 8, 1e-3
    losses, ref_forwards, policy_forwards, _ = trl_losses(demo_assets["model"], demo_cache, tmp_path / "trl",
                                                           steps=steps, batch_size=batch, lr=lr)
    assert ref_forwards == 0 and policy_forwards == steps  # one policy forward per step, nothing else
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
    train(TrainConfig(cache=str(demo_cache), out=str(tmp_path / "bso"), generator="logistic", safety_penalty=0.0,
                      pairs="none", orientation="better", optimizer="adamw", lr=lr, lr_schedule="constant",
                      warmup_ratio=0.0, grad_clip=0.0, weight_decay=0.0, batch_size=batch, max_steps=steps,
                      shuffle=False, seed=0, progress=False), log=lambda s: None)
    ours = [json.loads(x)["loss"] for x in (tmp_path / "bso" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == len(ours) == steps
    assert max(abs(a - b) for a, b in zip(losses, ours)) <= 1e-5, (losses, ours)
    assert ours[-1] < ours[0] - 0.01  # the runs learn, so equal losses say the updates are equal


def test_another_trl_version_is_refused_in_one_line(monkeypatch):
    import trl

    from bso_cache.errors import ConfigError
    from bso_cache.integrations.trl import check_trl_version

    monkeypatch.setattr(trl, "__version__", "2.0.0")
    with pytest.raises(ConfigError, match="tested with TRL 1.16, not 2.0.0"):
        check_trl_version()
    assert check_trl_version(allow_untested=True) == "2.0.0"
