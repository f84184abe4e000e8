"""`bso-cache train`: the policy alone, streamed from a cache, with any BSO loss.

One model is loaded (the policy; by default the manifest's reference, as a starting point);
the reference's log-probs come from the cache. Checkpoints (checkpoint.py) are atomic and
`--resume` continues exactly; DDP / FSDP live in parallel.py, the logged diagnostics in metrics.py.

The loop: `Trainer.run` -> `setup` (caches, run folder, policy, scorer, optimizer, schedule,
resume) -> the step-0 check (the first micro-batch's log-probs against the cache's) -> for each
step until the data or --max-steps ends: `_step` (forward/backward over this rank's
micro-batches, clip, update; returns tokens, gradient norm, lr) -> `_log` (metrics.jsonl,
trackers, held-out evaluation) -> checkpoints -> `_finish`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

from bso_cache import schemas as S
from bso_cache.cache import Cache, check_tokenizer, counts_text, manifest_path
from bso_cache.io.files import atomic_write_json, check_out, follow_umask
from bso_cache.training.checkpoint import (Position, clear_run_folder, finished_run, list_checkpoints, listed_files,
                                           load_checkpoint, refuse_changed, save_checkpoint,
                                           truncate_metrics)
from bso_cache.config import TrainConfig, to_dict
from bso_cache.io.dist import Dist
from bso_cache.errors import CacheError, ConfigError, TrainingError
from bso_cache.losses import loss_terms
from bso_cache.reporting.card import write_cards
from bso_cache.reporting.evaluate import evaluate_cache, other_reference
from bso_cache.training.metrics import MetricsWindow, step0_check, step0_tolerance
from bso_cache.reporting.trackers import for_run
from bso_cache.models import (add_lora, disable_dropout, enable_checkpointing, load_model, load_tokenizer,
                              locate_reference, resolve_attention, resolve_device, set_seed, weights_digest)
from bso_cache.quantize import check_quantization, merged_model
from bso_cache.training.optim import Updates, make_schedule
from bso_cache.data.pairs import PairBatch, count_pairs, epoch_batches, prefetch, token_ids
from bso_cache.io.locks import folder_lock
from bso_cache.training import parallel
from bso_cache.training.preflight import check_train
from bso_cache.io.allocator import heap_policy


class Trainer:
    def __init__(self, cfg: TrainConfig, *, log=print, report_group: str | None = None, on_log=None):
        self.cfg, self.log, self.report_group, self.on_log = cfg, log, report_group, on_log
        self.spec = cfg.loss_spec()
        self.device = resolve_device(cfg.device)
        self.dist = Dist.from_env(self.device)
        if self.dist.enabled and self.device.startswith("cuda"):
            self.device = f"cuda:{self.dist.local_rank}"
        self.out = Path(cfg.out)
        self.layout = S.RunLayout(self.out)
        self.position = Position()
        self._not_ours: set[str] = set()
        self._lock = contextlib.ExitStack()  # the run folder's lock, held from _prepare_out to the end of run

    # ------------------------------------------------------------------ setup
    def _open_caches(self) -> None:
        """The training cache and --eval-cache, every shard's checksum verified; an --eval-cache
        built by another reference is refused unless --allow-other-reference."""
        cfg = self.cfg
        self.cache = Cache.open(cfg.cache, expect_digest=cfg.expect_digest)
        self.manifest = self.cache.manifest
        self.eval_cache = Cache.open(cfg.eval_cache) if cfg.eval_cache else None
        if self.eval_cache and self.eval_cache.manifest.weights_digest != self.manifest.weights_digest \
                and not cfg.allow_other_reference:
            raise ConfigError(other_reference(f"--eval-cache {cfg.eval_cache}", self.eval_cache.manifest.reference_name,
                                              f"the reference of --cache, {self.manifest.reference_name}"))
        for name, cache in (("--cache", self.cache), ("--eval-cache", self.eval_cache)):
            if cache is not None:
                check_quantization(f"{name} {cache.path}", cache.manifest.reference_quantization, cfg.load_in_4bit)

    def _policy_source(self) -> tuple[str, str | None]:
        if self.cfg.policy:
            return self.cfg.policy, self.cfg.gguf_file
        return locate_reference(self.manifest.reference), self.manifest.reference_gguf

    def _prepare_out(self) -> None:
        if self.dist.is_main:
            check_out(self.out, "run")
            self._lock.enter_context(folder_lock(self.out, S.RunLayout.LOCK, refuse=lambda holder: ConfigError(
                f"{self.out}: another training run is writing this folder ({holder}); wait for it to finish, "
                f"or choose another --out")))
            existing = any(p.name != S.RunLayout.LOCK for p in self.out.iterdir())
            if existing and not self.cfg.resume:
                if not self.cfg.overwrite:
                    finished = " holds a finished run" if self.layout.summary.exists() else " is not empty"
                    raise ConfigError(f"{self.out}{finished}; pass --resume to continue the run there (a finished "
                                      f"one has nothing to do), --overwrite to replace it, or another --out")
                clear_run_folder(self.layout)
            elif existing:
                refuse_changed(self.layout, to_dict(self.cfg))
            self.out.mkdir(parents=True, exist_ok=True)
            # what the folder holds that this run did not write (a --resume'd folder's own files aside)
            self._not_ours = ({p.name for p in self.out.iterdir()} - S.RunLayout.own_names()
                              - set(listed_files(self.layout) or []))
        self.dist.barrier()

    def _load_policy(self) -> str:
        """Tokenizer (checked against the cache before any model loads), then the policy."""
        cfg = self.cfg
        name, gguf = self._policy_source()
        self.tokenizer = load_tokenizer(name, gguf_file=gguf, trust_remote_code=cfg.trust_remote_code)
        check_tokenizer(self.cache.path, self.manifest, self.tokenizer, name)
        self.start_digest = weights_digest(name, gguf)  # recorded: eval compares it with a cache's reference
        self.policy_is_reference = self.start_digest == self.manifest.weights_digest
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        set_seed(cfg.seed)
        model = load_model(name, dtype=cfg.dtype, device=self.device, gguf_file=gguf,
                           trust_remote_code=cfg.trust_remote_code, log=self.log, load_in_4bit=cfg.load_in_4bit,
                           attn_implementation=resolve_attention(cfg.attn_implementation, self.device, training=True))
        disable_dropout(model)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        self.model = add_lora(cfg, model) if cfg.lora_r else model
        self.model.train()
        return name

    def _make_scorer(self) -> None:
        """The pair scorer, whose prefix-sharing decision is made on the cache's first pairs in stored
        order (the same on every rank and every resume) with the bare model, then the same scorer
        over the DDP/FSDP-wrapped model (FSDP replaces the parameters the probe would run)."""
        from bso_cache.scoring.scorer import PairScorer, SequenceScorer

        cfg = self.cfg
        first = next(epoch_batches(self.cache, mode="none", orientation="better", batch_size=cfg.micro_batch, seed=0,
                                   epoch=0, shuffle=False), [])
        bare = PairScorer(self.model, sample=token_ids(first), prefix_sharing=cfg.prefix_sharing, device=self.device,
                          pad_id=self.pad_id, autocast=cfg.autocast, log=self.log)
        self.scorer = parallel.wrap(SequenceScorer(self.model), self.model, fsdp=cfg.fsdp, dist=self.dist,
                                    device=self.device)
        self.pair_scorer = bare.with_module(self.scorer)

    def _plan_steps(self) -> None:
        cfg = self.cfg
        self.pair_counts = counts = count_pairs(self.cache, cfg.pairs, cfg.orientation)
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
        # which bound ends the run, said in the log and the summary
        self.stopped_by = "max_steps" if cfg.max_steps and cfg.max_steps < total else "epochs"
        steps, epochs = f"--max-steps {cfg.max_steps}", f"--epochs {cfg.epochs}"
        self.bound_text = (f", {steps} ends the run before {epochs}" if self.stopped_by == "max_steps" else
                           f", {epochs} ends the run before {steps}" if cfg.max_steps else f", {epochs}")

    def setup(self) -> None:
        cfg = self.cfg
        self._open_caches()
        self._prepare_out()
        name = self._load_policy()
        self._make_scorer()
        self.updates = Updates(cfg, [p for p in self.model.parameters() if p.requires_grad])
        self.optimizer = self.updates.optimizer
        self._plan_steps()
        self.scheduler = make_schedule(cfg, self.optimizer, self.total_steps)
        if cfg.resume:
            self._resume()
        counts, spec = self.pair_counts, self.spec
        self.log(f"pairs: {counts.kept} kept, {counts.swapped} swapped, {counts.dropped} dropped "
                 f"of {counts.total} (--pairs {cfg.pairs}, --orientation {cfg.orientation})"
                 f"{'; ' + counts_text(counts.reasons) if counts.reasons else ''}")
        self.log(f"loss: {spec.generator} beta={spec.beta} C={spec.safety_penalty} "
                 f"clamp=[{spec.clamp_lower}, {spec.clamp_upper}] lambda={spec.lam} s={spec.scale}; "
                 f"{self.total_steps} steps of {min(cfg.batch_size, counts.kept)} pairs ({self.steps_per_epoch}/epoch"
                 f"{self.bound_text}); "
                 f"policy {name}{' (= the reference weights)' if self.policy_is_reference else ''}; "
                 f"{self.pair_scorer.describe()}")
        if self.dist.is_main:
            atomic_write_json(self.layout.run_config, {
                "config": to_dict(cfg), "loss": dataclasses.asdict(spec), "pairs": counts.as_dict(),
                "total_steps": self.total_steps, "stopped_by": self.stopped_by, "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.dist.world, "cache_manifest": str(manifest_path(self.cache.path)),
                "policy": name, "policy_is_reference": self.policy_is_reference, "start_weights_digest": self.start_digest,
                "prefix_sharing": self.pair_scorer.decision and self.pair_scorer.decision.to_json()})

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self) -> None:
        full_model, full_optim = parallel.full_state(self.scorer, self.optimizer, fsdp=self.cfg.fsdp)
        if self.dist.is_main:
            save_checkpoint(self.layout, self.position, self.total_steps, model=self.model,
                            optimizer=self.optimizer, scheduler=self.scheduler, fsdp=self.cfg.fsdp,
                            full_model=full_model, full_optim=full_optim, keep=self.cfg.keep_checkpoints)
        self.dist.barrier()

    def _resume(self) -> None:
        found = list_checkpoints(self.layout)
        if not found:
            self.log(f"--resume: no checkpoint in {self.layout.checkpoints}; starting from step 0")
            return
        self.position = load_checkpoint(found[-1], model=self.model, scorer=self.scorer, optimizer=self.optimizer,
                                        scheduler=self.scheduler, fsdp=self.cfg.fsdp, device=self.device)
        if self.dist.is_main:
            truncate_metrics(self.layout, self.position.step)
        self.log(f"resumed from {found[-1]} (step {self.position.step}, epoch {self.position.epoch})")

    # ------------------------------------------------------------------ the loop
    def _step_batches(self):
        """(epoch, step index in epoch, the step's pairs) from the current position.

        A step's pairs (--batch-size, length-bucketed) are the same whatever the number of
        processes and of accumulation steps; `parallel.share_step` cuts them into this rank's
        micro-batches.
        """
        cfg = self.cfg
        epoch, skip = self.position.epoch, self.position.steps_in_epoch
        while epoch < cfg.epochs:
            stream = epoch_batches(self.cache, mode=cfg.pairs, orientation=cfg.orientation,
                                   batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle,
                                   shuffle_buffer=cfg.shuffle_buffer, bucket_batches=cfg.bucket_batches)
            for j, batch in enumerate(stream):
                if j >= skip:
                    yield epoch, j, batch
            epoch, skip = epoch + 1, 0

    def _step(self, pairs: list, window: MetricsWindow) -> tuple[int, float, float]:
        """One optimizer step over the step's pairs (this rank's share); returns the tokens fed,
        the gradient norm (before clipping) and the learning rate the step used."""
        import torch

        mine = parallel.share_step(pairs, grad_accum=self.cfg.grad_accum, dist=self.dist)
        tokens = 0
        self.updates.zero()
        for k, (items, weight) in enumerate(mine):
            with parallel.grad_sync(self.scorer, fsdp=self.cfg.fsdp, dist=self.dist, last=k == len(mine) - 1):
                batch = PairBatch.of(items, self.pair_scorer.device)
                lp = self.pair_scorer(*batch.token_ids)
                terms = loss_terms(self.spec, lp.chosen, lp.rejected, batch.ref_chosen_logps,
                                   batch.ref_rejected_logps, batch.chosen_unsafe, batch.rejected_unsafe)
                losses = terms.losses
                if not bool(torch.isfinite(losses).all()):
                    raise TrainingError(
                        f"step {self.position.step + 1}: the loss is not finite (policy log-probs "
                        f"{lp.chosen.detach().min().item():.4g}..{lp.chosen.detach().max().item():.4g}); the "
                        f"policy diverged: lower --lr, keep --grad-clip, or use --autocast none")
                # sum over this step's pairs / all its pairs = the global-batch mean (DDP averages
                # over ranks, hence the factor world); weight 0 marks a rank's filler micro-batch
                (losses.sum() * (weight * self.dist.world / len(pairs))).backward()
            if weight:
                tokens += lp.tokens
                window.add(self.spec, terms, lp.chosen.detach(), lp.rejected.detach(), batch)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.updates.step()
        self.scheduler.step()
        return tokens, grad_norm, lr

    def _log(self, window: MetricsWindow, reporters, bar) -> dict:
        cfg = self.cfg
        step = self.position.step
        row = window.flush(step, self.position.epoch, self.dist)
        if self.eval_cache is not None and cfg.eval_every and step % cfg.eval_every == 0:
            row.update({f"eval/{k}": v for k, v in self._evaluate().items() if isinstance(v, (int, float))})
        if self.dist.is_main:
            with open(self.layout.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            if reporters is not None:
                reporters.log(row, step)
        bar.set_postfix_str(f"loss {row['loss']:.4g} acc {row['preference_accuracy']:.2f} "
                            f"{row['tokens_per_s']:,.0f} tok/s")
        return row

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            if getattr(self, "updates", None) is not None:
                self.updates.close()
            self._lock.close()

    def _run(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.setup()
        step0 = self._step0() if self.position.step == 0 else None  # once, before the loop
        stream = prefetch(self._step_batches())
        reporters = for_run(cfg, self.out, self.report_group) if self.dist.is_main else None
        bar = tqdm(total=self.total_steps, initial=self.position.step, unit="step", desc="training",
                   disable=not (cfg.progress and self.dist.is_main), dynamic_ncols=True)
        window, last = MetricsWindow(), {}
        try:
            t0 = time.perf_counter()
            for epoch, j, pairs in stream:  # ends with the last epoch's pairs
                if self.position.step >= self.total_steps:
                    break
                tokens, grad_norm, lr = self._step(pairs, window)
                self.position = Position(self.position.step + 1, epoch, j + 1)
                window.tick(time.perf_counter() - t0, tokens, grad_norm, lr)
                bar.update(1)
                step = self.position.step
                logged = step % cfg.log_every == 0 or step == self.total_steps
                if logged:
                    last = self._log(window, reporters, bar)
                if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
                    self._save_checkpoint()
                if logged and self.on_log is not None and self.dist.is_main:
                    self.on_log(last)  # after the step's checkpoint: a sweep's scheduler may stop the run here
                t0 = time.perf_counter()
            summary = self._finish(last, step0)
        except BaseException:
            if reporters is not None:
                reporters.close()
            raise
        finally:
            stream.close()  # stops the prefetch thread, also when a step raises
            bar.close()
        if reporters is not None:
            reporters.finish(summary, [self.out / f for f in summary["files"]], self.position.step)
        return summary

    def _finish(self, last: dict, step0: dict | None) -> dict:
        evaluation = self._evaluate() if self.eval_cache is not None else None  # the model as trained, unmerged
        files = self._save_final()
        summary = {"steps": self.position.step, "stopped_by": self.stopped_by, "final": last, "step0": step0,
                   "out": str(self.out), "pairs": self.pair_counts.as_dict(), "files": files}
        if evaluation is not None:
            summary["eval"] = evaluation
        if self.dist.is_main:  # the model card (README.md) is one of the run's files
            summary["files"] = sorted(set(files) | set(write_cards(self.layout, summary, manifest_path(self.cache.path))))
            atomic_write_json(self.layout.summary, summary)
        if self.dist.enabled:
            # DDP's reducer (C++ threads) must go before the process group, or the process can
            # abort at exit ("terminate called without an active exception")
            import gc

            self.scorer = self.pair_scorer = None
            self.optimizer = self.updates = None
            gc.collect()
        self.dist.close()
        return summary

    def _step0(self) -> dict:
        """The step-0 check on this rank's first micro-batch of the first step (no gradient): the
        policy's log-probs against the cache's, before any update."""
        import torch

        first = next(self._step_batches(), None)
        if first is None:
            return None
        items, _ = parallel.share_step(first[2], grad_accum=self.cfg.grad_accum, dist=self.dist)[0]
        batch = PairBatch.of(items, self.pair_scorer.device)
        with torch.no_grad():
            lp = self.pair_scorer(*batch.token_ids)
        return step0_check(batch, lp, tolerance=step0_tolerance(self.cfg, self.manifest),
                           policy_is_reference=self.policy_is_reference, log=self.log,
                           hint=f"cache: {self.manifest.reference_dtype}, policy: {self.cfg.dtype}, "
                                f"autocast {self.cfg.autocast}")

    def _evaluate(self) -> dict:
        module = self.scorer if self.cfg.fsdp else self.model  # under FSDP every rank joins the sharded scorer
        return evaluate_cache(self.pair_scorer.with_module(module), self.eval_cache,
                              batch_size=self.cfg.micro_batch)

    def _save_final(self) -> list[str]:
        """The final model and tokenizer in from_pretrained format; returns the names written."""
        full_model, _ = parallel.full_state(self.scorer, self.optimizer, fsdp=self.cfg.fsdp)
        if not self.dist.is_main:
            self.dist.barrier()
            return []
        model = self.model
        if self.cfg.lora_r:
            model.save_pretrained(str(self.layout.adapter))
            model = merged_model(model, self.cfg.dtype) if self.cfg.load_in_4bit else model.merge_and_unload()
        kwargs = {"state_dict": full_model} if full_model is not None else {}
        model.save_pretrained(str(self.out), safe_serialization=True, **kwargs)
        self.tokenizer.save_pretrained(str(self.out))
        files = sorted({p.name for p in self.out.iterdir()} - S.RunLayout.own_names() - self._not_ours)
        follow_umask([self.out / f for f in files] + list(self.layout.adapter.glob("*")))
        self.dist.barrier()
        return files


def train(cfg: TrainConfig, *, log=print, report_group: str | None = None, on_log=None) -> dict:
    """Train; with --resume on a finished run (same settings), say so and change nothing."""
    device = resolve_device(cfg.device)
    check_train(cfg, device)
    heap_policy(cfg, device, log)
    done = finished_run(S.RunLayout(Path(cfg.out)), to_dict(cfg)) if cfg.resume else None
    if done is not None:
        log(f"{cfg.out}: this run is finished ({done.get('steps')} steps); nothing to do (--overwrite trains it again)")
        return done
    return Trainer(cfg, log=log, report_group=report_group, on_log=on_log).run()
