"""Training checkpoints: written atomically, resumed exactly (weights, optimizer, scheduler, RNG,
position in the stream), with and without FSDP.

A checkpoint is `checkpoints/step-NNNNNNNN/` holding the weights (safetensors), the trainer state
(`torch.load(weights_only=True)`: optimizer, scheduler, RNG states) and `state.json` (step,
epoch, steps done in the epoch). It is written as `step-N.tmp` and renamed, so a killed run
leaves only complete checkpoints. Under FSDP the full (gathered) state is saved, so the files
are the same as without it.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from bso_cache.config import TrainConfig, names
from bso_cache.io.files import atomic_write_json, follow_umask
from bso_cache.errors import ConfigError
from bso_cache.schemas import RunLayout


@dataclass
class Position:
    """Where a run stands: optimizer steps done, the epoch, and steps done within it."""

    step: int = 0
    epoch: int = 0
    steps_in_epoch: int = 0


def list_checkpoints(layout: RunLayout) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = layout.checkpoints
    if not d.is_dir():
        return []
    done = [p for p in d.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp")
            and (p / RunLayout.CHECKPOINT_STATE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {"torch_rng": torch.get_rng_state(), "numpy_rng": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_rng_rest": list(np_state[2:]), "python_rng": json.dumps(random.getstate())}


def _set_rng_state(blob: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(blob["torch_rng"])
    np.random.set_state(("MT19937", blob["numpy_rng"].numpy().astype(np.uint32), *blob["numpy_rng_rest"]))
    py = json.loads(blob["python_rng"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(layout: RunLayout, position: Position, total_steps: int, *, model, optimizer, scheduler,
                    fsdp: bool, full_model: dict | None, full_optim: dict | None, keep: int) -> Path:
    """Write checkpoint `step-N` (the caller is rank 0; under FSDP it passes the gathered state)."""
    import torch
    from safetensors.torch import save_file, save_model

    layout.checkpoints.mkdir(exist_ok=True)
    final = layout.checkpoint(position.step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = tmp / RunLayout.CHECKPOINT_WEIGHTS
    trainable = _trainable(model)
    if full_model is not None:
        save_file({k: v.detach().clone().contiguous() for k, v in full_model.items()}, str(weights))
    elif trainable is not None:  # LoRA / QLoRA: the frozen base is the policy's source, loaded again on resume
        save_file({k: v.detach().contiguous() for k, v in trainable.items()}, str(weights))
    else:
        save_model(model, str(weights))
    follow_umask([weights])
    torch.save({"optimizer": full_optim if full_optim is not None else optimizer.state_dict(), "fsdp": fsdp,
                "scheduler": scheduler.state_dict(), **_rng_state()}, tmp / RunLayout.TRAINER_STATE)
    atomic_write_json(tmp / RunLayout.CHECKPOINT_STATE, {**position.__dict__, "total_steps": total_steps})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(layout)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _trainable(model) -> dict | None:
    """The trained parameters by state-dict name when some are frozen (LoRA), else None."""
    params = dict(model.named_parameters())
    trained = {k: v for k, v in params.items() if v.requires_grad}
    return trained if len(trained) < len(params) else None


def load_checkpoint(checkpoint: Path, *, model, scorer, optimizer, scheduler, fsdp: bool, device: str) -> Position:
    """Restore weights, optimizer, scheduler and RNG from `checkpoint`; returns its position.

    Under FSDP every rank calls this (the state is scattered from the full copy on disk).
    """
    import torch
    from safetensors.torch import load_file, load_model

    state = json.loads((checkpoint / RunLayout.CHECKPOINT_STATE).read_text())
    blob = torch.load(checkpoint / RunLayout.TRAINER_STATE, map_location="cpu", weights_only=True)
    if bool(blob.get("fsdp", False)) != fsdp:
        raise ConfigError(f"{checkpoint} was written {'with' if blob.get('fsdp') else 'without'} --fsdp; "
                          f"resume it the same way")
    weights = checkpoint / RunLayout.CHECKPOINT_WEIGHTS
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        full = {"lm." + k: v for k, v in load_file(str(weights)).items()}
        set_state_dict(scorer, optimizer, model_state_dict=full, optim_state_dict=blob["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    elif (trainable := _trainable(model)) is not None:
        saved = load_file(str(weights), device=device)
        missing = sorted(set(trainable) - set(saved))
        if missing:
            raise ConfigError(f"{checkpoint}: holds no {missing[0]} ({len(missing)} trained tensors missing); "
                              f"resume it with the run's own settings")
        model.load_state_dict(saved, strict=False)
        optimizer.load_state_dict(blob["optimizer"])
    else:
        load_model(model, str(weights), device=device)
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob)
    return Position(state["step"], state["epoch"], state["steps_in_epoch"])


def truncate_metrics(layout: RunLayout, step: int) -> None:
    """Drop the metrics lines logged after `step` (a resumed run logs them again)."""
    path = layout.metrics
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


# What `save_pretrained` of a model and a tokenizer writes (for run folders whose summary predates
# the list of files).
_SAVE_PRETRAINED_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json",
                          "tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                          "chat_template.jinja")


def listed_files(layout: RunLayout) -> list[str] | None:
    """The final model's files a finished run listed in its summary; None without a summary or list."""
    try:
        listed = json.loads(layout.summary.read_text()).get("files")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return listed if isinstance(listed, list) else None


def clear_run_folder(layout: RunLayout) -> None:
    """`--overwrite`: remove what a training run wrote into its folder, and nothing else.

    A run writes the names of `RunLayout.own_names()` and lists the final model's files in its
    summary; anything else in the folder is the user's, so the folder is refused (and left as it
    is) when it holds anything else.
    """
    import fnmatch

    root = layout.root
    owned = set(RunLayout.own_names())
    listed = listed_files(layout)
    if listed is not None:
        owned |= set(listed)
    # without the list (a run killed between saving its model and its summary): the names
    # save_pretrained writes
    patterns = () if listed is not None else _SAVE_PRETRAINED_FILES
    foreign = sorted(p.name for p in root.iterdir()
                     if p.name not in owned and not any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    if foreign:
        raise ConfigError(f"{root} holds {foreign[0]}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, "
                          f"which no training run wrote; --overwrite removes only a run's own files. Choose "
                          f"another --out, or move those files away")
    for p in root.iterdir():
        if p.name != RunLayout.LOCK:  # held by this run: a new lock file would let a second writer in
            shutil.rmtree(p) if p.is_dir() else p.unlink()


# Options a resumed run may change: they decide where and how it reports, not what it computes.
RESUME_FREE = frozenset(names(TrainConfig, resume=True))  # the options with resume=True (config/train.py)


def changed_settings(layout: RunLayout, config: dict) -> list[str]:
    """The options (`--name old -> new`) in which `config` differs from the run's run_config.json."""
    try:
        started = json.loads(layout.run_config.read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return []
    return [f"--{k.replace('_', '-')} {started[k]!r} -> {v!r}" for k, v in config.items()
            if k not in RESUME_FREE and k in started and started[k] != v]


def refuse_changed(layout: RunLayout, config: dict) -> None:
    changed = changed_settings(layout, config)
    if changed:
        raise ConfigError(f"--resume: {layout.root} was started with other settings ({'; '.join(changed)}); "
                          f"resume it with the run's own settings, or start again with --overwrite or another --out")


def finished_run(layout: RunLayout, config: dict) -> dict | None:
    """A finished run's summary (after refusing changed settings), or None when it is not finished."""
    try:
        summary = json.loads(layout.summary.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    refuse_changed(layout, config)
    return {**summary, "nothing_to_do": True}
