"""`bso-cache train`: the policy alone, streamed from a cache, with any BSO loss.

One model is loaded (the policy; by default the reference recorded in the manifest, as a
starting point). The reference is never loaded: its log-probs come from the cache. Before the
first update the policy's log-probs on the first batch are compared with the cached ones (the
step-0 check). Checkpoints (weights in safetensors, optimizer/scheduler/RNG, stream position)
are written atomically; `--resume` continues from the newest one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path

from . import schemas as S
from .cache import Cache, atomic_write_json, check_tokenizer
from .config import TrainConfig, to_dict
from .dist import Dist
from .errors import CacheError, ConfigError, MismatchError, TrainingError
from .losses import spec_loss
from .metrics import MetricsWindow, evaluate_cache
from .models import load_model, load_tokenizer, resolve_device, weights_digest
from .pairs import count_pairs, epoch_batches

CKPT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"


def step0_tolerance(cfg: TrainConfig, manifest: dict) -> float:
    """Largest |log pi - log pi_ref| per response token (nats) still counted as agreement.

    float32 on both sides differs by ~1e-6 per token (batching, padding); bf16/fp16 on either
    side by up to a few 1e-2. A cache of other weights, tokenizer or template is off by ~0.1 to
    several nats per token.
    """
    if cfg.step0_tolerance is not None:
        return cfg.step0_tolerance
    exact = cfg.dtype == "float32" and cfg.autocast == "none" \
        and manifest["reference_pass"]["dtype"] == "float32"
    return 1e-3 if exact else 0.05


def _set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _disable_dropout(model) -> None:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def _optimizer(cfg: TrainConfig, params):
    import torch

    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _schedule(cfg: TrainConfig, optimizer, total_steps: int):
    import torch

    warmup = math.ceil(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:  # step = number of updates done so far
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _checkpoints(out: Path) -> list[Path]:
    d = out / CKPT_DIR
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp")
            and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


class Trainer:
    def __init__(self, cfg: TrainConfig, *, log=print):
        cfg.validate()
        self.cfg = cfg
        self.log = log
        self.spec = cfg.loss_spec()
        self.device = resolve_device(cfg.device)
        self.dist = Dist.from_env(self.device)
        if self.dist.enabled and self.device.startswith("cuda"):
            self.device = f"cuda:{self.dist.local_rank}"
        self.out = Path(cfg.out)
        self.cache = Cache.open(cfg.cache)  # verifies every shard's checksum
        self.manifest = self.cache.manifest
        self.eval_cache = Cache.open(cfg.eval_cache) if cfg.eval_cache else None

    # ------------------------------------------------------------------ setup
    def _policy_source(self) -> tuple[str, str | None]:
        if self.cfg.policy:
            return self.cfg.policy, self.cfg.gguf_file
        ref = self.manifest["reference"]
        return ref["name_or_path"], ref.get("gguf_file")

    def _prepare_out(self) -> None:
        if self.dist.is_main:
            existing = self.out.exists() and any(self.out.iterdir())
            if existing and not self.cfg.resume:
                if not self.cfg.overwrite:
                    raise ConfigError(f"{self.out} is not empty; pass --resume to continue the run "
                                      f"there, --overwrite to replace it, or another --out")
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        self.dist.barrier()

    def setup(self) -> None:
        import torch

        cfg = self.cfg
        self._prepare_out()
        name, gguf = self._policy_source()
        self.tokenizer = load_tokenizer(name, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
        check_tokenizer(self.cache.path, self.manifest, self.tokenizer, name)
        self.policy_is_reference = weights_digest(name, gguf) == self.manifest["reference"]["weights_digest"]
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        _set_seed(cfg.seed)
        model = load_model(name, dtype=cfg.dtype, device=self.device, gguf_file=gguf,
                           trust_remote_code=cfg.trust_remote_code)
        _disable_dropout(model)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if cfg.lora_r:
            model = self._lora(model)
        model.train()
        self.model = model
        from .scoring import PairScorer, SequenceScorer

        self.pair_scorer = PairScorer(model, prefix_sharing=cfg.prefix_sharing, device=self.device,
                                      pad_id=self.pad_id, autocast=cfg.autocast, log=self.log)
        self._decide_prefix_sharing()
        self.scorer = SequenceScorer(model)
        if cfg.fsdp:
            if not self.dist.enabled:
                raise ConfigError("--fsdp shards the model over torchrun processes; run under torchrun "
                                  "(torchrun --nproc-per-node N -m bso_cache train ...)")
            from torch.distributed.fsdp import fully_shard

            blocks = set(getattr(model, "_no_split_modules", None) or [])
            for module in model.modules():
                if type(module).__name__ in blocks:
                    fully_shard(module)
            fully_shard(self.scorer)  # embeddings, final norm and head: gathered in the scorer's forward
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.scorer = DDP(self.scorer, device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None)
        self.pair_scorer.module = self.scorer
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(cfg, params)
        counts = count_pairs(self.cache, cfg.pairs, cfg.orientation)
        self.pair_counts = counts
        if counts.kept == 0:
            raise CacheError(f"{self.cache.path}: no pair is left after --pairs {cfg.pairs} "
                             f"--orientation {cfg.orientation} ({counts.as_dict()})")
        parts = cfg.grad_accum * self.dist.world
        if cfg.batch_size % parts:
            raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --grad-accum x processes "
                              f"({cfg.grad_accum} x {self.dist.world})")
        self.steps_per_epoch = math.ceil(counts.kept / cfg.batch_size)
        total = self.steps_per_epoch * cfg.epochs
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.scheduler = _schedule(cfg, self.optimizer, self.total_steps)
        self.step, self.epoch, self.steps_in_epoch = 0, 0, 0
        if cfg.resume:
            self._load_checkpoint()
        self.log(f"pairs: {counts.kept} kept, {counts.swapped} swapped, {counts.dropped} dropped "
                 f"of {counts.total} (--pairs {cfg.pairs}, --orientation {cfg.orientation}) "
                 f"{counts.reasons or ''}")
        self.log(f"loss: {self.spec.generator} beta={self.spec.beta} C={self.spec.safety_penalty} "
                 f"clamp=[{self.spec.clamp_lower}, {self.spec.clamp_upper}] lambda={self.spec.lam} "
                 f"s={self.spec.scale}; {self.total_steps} steps of {cfg.batch_size} pairs "
                 f"({self.steps_per_epoch}/epoch); policy {name}"
                 f"{' (= the reference weights)' if self.policy_is_reference else ''}; "
                 f"{self.pair_scorer.describe()}")
        if self.dist.is_main:
            atomic_write_json(self.out / "run_config.json", {
                "config": to_dict(cfg), "loss": dataclasses.asdict(self.spec), "pairs": counts.as_dict(),
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.dist.world, "cache_manifest": str(self.cache.path / S.MANIFEST_NAME),
                "policy": name, "policy_is_reference": self.policy_is_reference,
                "prefix_sharing": {"used": self.pair_scorer.sharing, "probe": self.pair_scorer.probe}})
        del torch

    def _decide_prefix_sharing(self) -> None:
        """Settle prefix sharing on the cache's first pairs (in stored order, so every rank decides
        the same), before any DDP/FSDP wrapping: the probe runs the bare model."""
        first = next(epoch_batches(self.cache, mode="none", orientation="better", batch_size=4, seed=0,
                                   epoch=0, shuffle=False), [])
        self.pair_scorer.decide([it.prompt_ids for it in first], [it.chosen_ids for it in first],
                                [it.rejected_ids for it in first])

    def _lora(self, model):
        cfg = self.cfg
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("--lora-r needs the `peft` package: pip install 'bso-cache[lora]'") from None
        target = "all-linear" if cfg.lora_target == "all-linear" else cfg.lora_target.split(",")
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=target, task_type="CAUSAL_LM")
        return get_peft_model(model, lcfg)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        import numpy as np
        import torch
        from safetensors.torch import save_model

        full_model, full_optim = self._full_state()
        if not self.dist.is_main:
            self.dist.barrier()
            return
        ckdir = self.out / CKPT_DIR
        ckdir.mkdir(exist_ok=True)
        final = ckdir / f"step-{self.step:08d}"
        tmp = ckdir / (final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if full_model is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().clone().contiguous() for k, v in full_model.items()}, str(tmp / "model.safetensors"))
        else:
            save_model(self.model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": full_optim if full_optim is not None else self.optimizer.state_dict(),
                    "fsdp": self.cfg.fsdp, "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                    "numpy_rng_rest": list(np.random.get_state()[2:]),
                    "python_rng": json.dumps(random.getstate())}, tmp / TRAINER_STATE)
        atomic_write_json(tmp / "state.json", {"step": self.step, "epoch": self.epoch,
                                               "steps_in_epoch": self.steps_in_epoch,
                                               "total_steps": self.total_steps})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in _checkpoints(self.out)[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()

    def _load_checkpoint(self) -> None:
        import numpy as np
        import torch
        from safetensors.torch import load_model as load_weights

        found = _checkpoints(self.out)
        if not found:
            self.log(f"--resume: no checkpoint in {self.out / CKPT_DIR}; starting from step 0")
            return
        ck = found[-1]
        state = json.loads((ck / "state.json").read_text())
        blob = torch.load(ck / TRAINER_STATE, map_location="cpu", weights_only=True)
        if bool(blob.get("fsdp", False)) != self.cfg.fsdp:
            raise ConfigError(f"{ck} was written {'with' if blob.get('fsdp') else 'without'} --fsdp; resume it the same way")
        if self.cfg.fsdp:
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            weights = {"lm." + k: v for k, v in load_file(str(ck / "model.safetensors")).items()}
            set_state_dict(self.scorer, self.optimizer, model_state_dict=weights, optim_state_dict=blob["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            load_weights(self.model, str(ck / "model.safetensors"), device=self.device)
            self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        np.random.set_state(("MT19937", blob["numpy_rng"].numpy().astype(np.uint32), *blob["numpy_rng_rest"]))
        py = json.loads(blob["python_rng"])
        random.setstate((py[0], tuple(py[1]), py[2]))
        self.step, self.epoch, self.steps_in_epoch = state["step"], state["epoch"], state["steps_in_epoch"]
        metrics = self.out / "metrics.jsonl"
        if metrics.exists() and self.dist.is_main:  # drop lines logged after the checkpoint
            keep = [ln for ln in metrics.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        self.log(f"resumed from {ck} (step {self.step}, epoch {self.epoch})")

    # ------------------------------------------------------------------ the loop
    def _step_batches(self):
        """(epoch, step index in epoch, the step's pairs) from the current position.

        A step's pairs (--batch-size, length-bucketed) are the same whatever the number of
        processes and of accumulation steps; `_share` cuts them into this rank's micro-batches.
        """
        cfg = self.cfg
        epoch, skip = self.epoch, self.steps_in_epoch
        while epoch < cfg.epochs:
            stream = epoch_batches(self.cache, mode=cfg.pairs, orientation=cfg.orientation,
                                   batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                   shuffle_buffer=cfg.shuffle_buffer, bucket_batches=cfg.bucket_batches)
            for j, batch in enumerate(stream):
                if j < skip:
                    continue
                yield epoch, j, batch
            epoch, skip = epoch + 1, 0
        yield epoch, 0, None

    def run(self) -> dict:
        import torch
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.setup()
        stream = _prefetch(self._step_batches())
        tol = step0_tolerance(cfg, self.manifest)
        metrics_path = self.out / "metrics.jsonl"
        tb = self._tensorboard()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", desc="training",
                   disable=not (cfg.progress and self.dist.is_main), dynamic_ncols=True)
        window = MetricsWindow()
        step0 = None
        last = {}
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                epoch, j, pairs = next(stream)
                if pairs is None:  # the last epoch is used up
                    break
                mine = self._share(pairs)
                n_pairs = len(pairs)
                tokens = 0
                self.optimizer.zero_grad(set_to_none=True)
                for k, (batch, weight) in enumerate(mine):
                    with self._sync(k == len(mine) - 1):
                        lp = self.pair_scorer([it.prompt_ids for it in batch], [it.chosen_ids for it in batch],
                                              [it.rejected_ids for it in batch])
                        pc, pr, ntok = lp.chosen, lp.rejected, lp.tokens
                        ref_c, ref_r, s_c, s_r = _batch_tensors(batch, pc.device)
                        if step0 is None and self.step == 0:
                            step0 = self._step0(batch, pc, pr, ref_c, ref_r, tol)
                        losses = spec_loss(self.spec, pc, pr, ref_c, ref_r, s_c, s_r)
                        if not bool(torch.isfinite(losses).all()):
                            raise TrainingError(
                                f"step {self.step + 1}: the loss is not finite (policy log-probs "
                                f"{pc.detach().min().item():.4g}..{pc.detach().max().item():.4g}); the policy "
                                f"diverged: lower --lr, keep --grad-clip, or use --autocast none")
                        # sum over this step's pairs / all its pairs = the global-batch mean (DDP averages
                        # over ranks, hence the factor world); weight 0 marks a rank's filler micro-batch
                        (losses.sum() * (weight * self.dist.world / n_pairs)).backward()
                    if weight:
                        tokens += ntok
                        window.add(self.spec, losses.detach(), pc.detach(), pr.detach(), ref_c, ref_r, s_c, s_r)
                clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], clip)
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # DTensor under FSDP
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.epoch, self.steps_in_epoch = epoch, j + 1
                window.tick(time.perf_counter() - t0, tokens, grad_norm, lr)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    last = window.flush(self.step, self.epoch, self.dist)
                    if self.eval_cache is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                        last.update({f"eval/{k}": v for k, v in self._evaluate().items()})
                    if self.dist.is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(last) + "\n")
                        if tb is not None:
                            for k, v in last.items():
                                if isinstance(v, (int, float)) and k != "step":
                                    tb.add_scalar(k, v, self.step)
                    bar.set_postfix_str(f"loss {last['loss']:.4g} acc {last['preference_accuracy']:.2f} "
                                        f"{last['tokens_per_s']:,.0f} tok/s")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self._save_checkpoint()
        finally:
            stream.close()  # stops the prefetch thread, also when a step raises
        bar.close()
        if tb is not None:
            tb.close()
        self._save_final()
        summary = {"steps": self.step, "final": last, "step0": step0, "out": str(self.out),
                   "pairs": self.pair_counts.as_dict()}
        if self.eval_cache is not None:
            summary["eval"] = evaluate_cache(self.pair_scorer.with_module(self._eval_model), self.eval_cache,
                                             batch_size=self.cfg.micro_batch)
        if self.dist.is_main:
            atomic_write_json(self.out / "summary.json", summary)
        if self.dist.enabled:
            # DDP's reducer (C++ threads) must go before the process group, or the process can
            # abort at exit ("terminate called without an active exception")
            import gc

            self.scorer = None
            self.optimizer = None
            gc.collect()
        self.dist.close()
        return summary

    @property
    def _eval_model(self):
        """Under FSDP the sharded scorer (every rank joins its collectives), else the bare model."""
        return self.scorer if self.cfg.fsdp else self.model

    def _sync(self, last: bool):
        """Gradient synchronisation only on the last micro-batch of a step (DDP / FSDP)."""
        if not self.dist.enabled or last:
            if self.cfg.fsdp:
                self.scorer.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.cfg.fsdp:
            self.scorer.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.scorer.no_sync()

    def _full_state(self):
        """(model state dict without the scorer prefix, optimizer state dict), full, on the CPU.
        Under FSDP this is a collective: every rank must call it."""
        if not self.cfg.fsdp:
            return None, None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        msd, osd = get_state_dict(self.scorer, self.optimizer,
                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("lm."): v for k, v in msd.items()}, osd

    def _share(self, pairs: list) -> list:
        """This rank's micro-batches of a step, as (batch, weight): the step's pairs cut into
        grad_accum x world contiguous slices, slice i going to rank i % world. Every rank runs the
        same number of forward/backward passes (DDP needs each to join every all-reduce); a rank
        whose slice is empty (a short last step) re-runs a pair with weight 0."""
        parts = self.cfg.grad_accum * self.dist.world
        size = -(-len(pairs) // parts)
        slices = [pairs[i * size:(i + 1) * size] for i in range(parts)]
        mine = slices[self.dist.rank::self.dist.world]
        return [(b, 1.0) if b else (pairs[:1], 0.0) for b in mine]

    def _step0(self, batch, pc, pr, ref_c, ref_r, tol: float) -> dict:
        """Compare the policy's first log-probs with the cached ones, per response token."""
        import torch

        diff = torch.cat([pc.detach().double() - ref_c, pr.detach().double() - ref_r]).abs().cpu()
        tokens = torch.tensor([len(it.chosen_ids) for it in batch] + [len(it.rejected_ids) for it in batch],
                              dtype=torch.float64)
        per_token = diff / tokens
        figure = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                  "max_per_token": float(per_token.max()), "sequences": int(diff.numel()),
                  "tolerance_per_token": tol, "policy_is_reference": self.policy_is_reference}
        ok = figure["max_per_token"] <= tol
        self.log(f"step-0 check: max |log pi - log pi_ref| = {figure['max_abs_diff']:.3g} nats per sequence "
                 f"({figure['max_per_token']:.2g} per token; mean {figure['mean_abs_diff']:.3g}) over "
                 f"{figure['sequences']} sequences: {'agree' if ok else 'DISAGREE'} (tolerance {tol:g} nats per "
                 f"token; policy {'is' if self.policy_is_reference else 'is not'} the reference weights)")
        if self.policy_is_reference and not ok:
            raise MismatchError(
                f"step-0 check failed: the policy starts from the cache's reference weights, yet its "
                f"log-probs differ from the cached ones by up to {figure['max_abs_diff']:.3g} nats "
                f"({figure['max_per_token']:.2g} per token, tolerance {tol:g}). Usual causes: the cache was "
                f"built from other weights or another tokenizer/template, or in another dtype (cache: "
                f"{self.manifest['reference_pass']['dtype']}, policy: {self.cfg.dtype}, autocast "
                f"{self.cfg.autocast}). Rebuild the cache, or raise --step0-tolerance if the difference is intended")
        return figure

    def _evaluate(self) -> dict:
        res = evaluate_cache(self.pair_scorer.with_module(self._eval_model), self.eval_cache,
                             batch_size=self.cfg.micro_batch)
        return {k: v for k, v in res.items() if isinstance(v, (int, float))}

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.dist.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the `tensorboard` package: pip install 'bso-cache[tensorboard]'") from None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _save_final(self) -> None:
        full_model, _ = self._full_state()
        if not self.dist.is_main:
            self.dist.barrier()
            return
        model = self.model
        if self.cfg.lora_r:
            model.save_pretrained(str(self.out / "adapter"))
            model = model.merge_and_unload()
        if full_model is not None:
            model.save_pretrained(str(self.out), state_dict=full_model, safe_serialization=True)
        else:
            model.save_pretrained(str(self.out), safe_serialization=True)
        self.tokenizer.save_pretrained(str(self.out))
        self.dist.barrier()


def _prefetch(iterator, depth: int = 2):
    """Iterate in a background thread, `depth` items ahead, so that reading shards and building
    batches overlaps the model's work. Exceptions are re-raised in the consumer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    thread = threading.Thread(target=produce, daemon=True, name="bso-cache-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let it leave any native call (Parquet reads) before we go on
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def _batch_tensors(batch, device):
    import torch

    ref_c = torch.tensor([it.ref_chosen_logp for it in batch], dtype=torch.float64, device=device)
    ref_r = torch.tensor([it.ref_rejected_logp for it in batch], dtype=torch.float64, device=device)
    s_c = torch.tensor([it.chosen_unsafe for it in batch], dtype=torch.float64, device=device)
    s_r = torch.tensor([it.rejected_unsafe for it in batch], dtype=torch.float64, device=device)
    return ref_c, ref_r, s_c, s_r


def train(cfg: TrainConfig, *, log=print) -> dict:
    return Trainer(cfg, log=log).run()
