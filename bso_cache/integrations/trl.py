"""TRL's `DPOTrainer` trained from a bso-cache cache: no reference model, no reference forward,
no re-tokenization.

    from trl import DPOConfig
    from bso_cache.integrations.trl import CacheDPOTrainer

    trainer = CacheDPOTrainer(model=policy, args=DPOConfig(output_dir="out", ...), cache="caches/pku",
                              processing_class=tokenizer)
    trainer.train()

The cache's pairs become a `datasets.Dataset` of `prompt_ids`, `chosen_ids`, `rejected_ids` (the
token ids exactly as built and scored) and `ref_chosen_logps` / `ref_rejected_logps` (the cached
reference log-probs), in the cache's order; `pairs` / `orientation` apply bso-cache's pair
handling (e.g. `pairs="safedpo"`: SafeDPO's reorientation of pairs with one unsafe response).
TRL's own losses then run on them (`loss_type`, `beta`, ...); the BSO generators run in
`bso-cache train`.

TRL 1.16 reads cached reference log-probs only with `precompute_ref_log_probs=True`, and then
recomputes them; this trainer sets that flag (so TRL keeps no reference model) and replaces the
recomputation and the dataset preparation with the cache. `max_length` is set to None: the
cache's own length policy (`build --max-length`, `--overlong`) already holds, and TRL's collator
would cut sequences the reference scored whole. The private TRL methods it replaces are checked
against the TRL versions in TESTED_TRL; another version is refused in one line
(`allow_untested_trl=True` runs it anyway).
"""

from __future__ import annotations

from pathlib import Path

from bso_cache.errors import ConfigError

TESTED_TRL = ("1.16",)
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def check_trl_version(allow_untested: bool = False) -> str:
    import trl

    version = trl.__version__
    if not allow_untested and not any(version == v or version.startswith(v + ".") for v in TESTED_TRL):
        raise ConfigError(f"bso_cache.integrations.trl is tested with TRL {', '.join(TESTED_TRL)}, not {version}: it "
                          f"replaces private DPOTrainer methods that may have changed; pip install 'trl~=1.16.0', or "
                          f"pass allow_untested_trl=True and check the step-0 loss (ln 2 for DPO)")
    return version


def cache_dataset(cache, *, pairs: str = "none", orientation: str = "better"):
    """The cache's pairs as a TRL-ready `datasets.Dataset` (token ids and reference log-probs)."""
    from datasets import Dataset

    from bso_cache.cache import Cache
    from bso_cache.data.pairs import iter_items

    c = cache if isinstance(cache, Cache) else Cache.open(Path(cache))
    rows = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "ref_chosen_logps": [], "ref_rejected_logps": []}
    for it in iter_items(c, pairs, orientation):
        rows["prompt_ids"].append(list(it.prompt_ids))
        rows["chosen_ids"].append(list(it.chosen_ids))
        rows["rejected_ids"].append(list(it.rejected_ids))
        rows["ref_chosen_logps"].append(float(it.ref_chosen_logp))
        rows["ref_rejected_logps"].append(float(it.ref_rejected_logp))
    if not rows["prompt_ids"]:
        raise ConfigError(f"{c.path}: no pair is left with pairs={pairs!r}, orientation={orientation!r}")
    return Dataset.from_dict(rows)


def _trainer_class():
    from trl import DPOTrainer

    class CacheDPOTrainer(DPOTrainer):
        """`DPOTrainer` on a bso-cache cache (see the module's docstring)."""

        def __init__(self, model, args, cache, *, processing_class, eval_cache=None, pairs: str = "none",
                     orientation: str = "better", allow_untested_trl: bool = False, **kwargs):
            from bso_cache.cache import Cache, check_tokenizer

            check_trl_version(allow_untested_trl)
            if "train_dataset" in kwargs or "ref_model" in kwargs:
                raise ConfigError("CacheDPOTrainer takes the cache instead of train_dataset and ref_model")
            datasets = {}
            for key, path in (("train_dataset", cache), ("eval_dataset", eval_cache)):
                if path is None:
                    continue
                c = Cache.open(Path(path))
                tok = getattr(processing_class, "tokenizer", processing_class)
                check_tokenizer(c.path, c.manifest, tok, getattr(tok, "name_or_path", "the processing_class"))
                datasets[key] = cache_dataset(c, pairs=pairs, orientation=orientation)
            args.precompute_ref_log_probs = True  # no reference model; the log-probs come from the cache
            args.max_length = None
            self.reference_forwards = 0
            super().__init__(model=model, args=args, processing_class=processing_class, **datasets, **kwargs)

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # token ids as built: nothing to extract, add or tokenize

        def _precompute_ref_logps(self, dataset, name, batch_size):
            missing = [c for c in REF_COLUMNS if c not in dataset.column_names]
            if missing:
                raise ConfigError(f"the {name} dataset has no {missing[0]} column: give a bso-cache cache")
            return dataset  # the cache's reference log-probs: no reference forward

        def compute_ref_log_probs(self, model, inputs):  # never needed with a cache; counted if TRL calls it
            self.reference_forwards += 1
            return super().compute_ref_log_probs(model, inputs)

    return CacheDPOTrainer


def __getattr__(name: str):
    if name == "CacheDPOTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
