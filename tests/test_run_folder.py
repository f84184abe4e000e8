"""A training run's folder: file modes, `--resume` on finished and unfinished runs (same
settings only, nothing changed when refused), and one writer per run or sweep folder."""

from __future__ import annotations

import fcntl
import os
import stat

import pytest

from bso_cache import schemas as S

from .conftest import cli_in_process, digests, one_line_error


def test_model_files_follow_the_umask(demo_cache, tmp_path):
    from bso_cache.config import TrainConfig
    from bso_cache.training.train import train

    old = os.umask(0o022)
    try:
        train(TrainConfig(cache=str(demo_cache), out=str(tmp_path / "r"), max_steps=2, batch_size=4, save_every=1,
                          progress=False), log=lambda s: None)
    finally:
        os.umask(old)
    ckpt = next((tmp_path / "r" / "checkpoints").iterdir())
    for path in (tmp_path / "r" / "model.safetensors", ckpt / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_resume_on_a_finished_run_changes_nothing_and_other_settings_are_refused(demo_cache, tmp_path):
    """A finished run (no checkpoints: --save-every 0) is complete: --resume says so and changes
    nothing; resuming with other settings is refused naming them; without --resume the refusal
    does not send the user to a retrain."""
    out = tmp_path / "run"
    args = ("train", "--cache", demo_cache, "--out", out, "--max-steps", 2, "--batch-size", 4, "--no-progress")
    cli_in_process(*args)
    before = digests(out)
    proc = cli_in_process(*args, "--resume")
    assert "finished earlier 2 steps" in proc.stdout and "nothing to do" in proc.stderr
    assert digests(out) == before
    one_line_error(cli_in_process(*args, "--resume", "--lr", "5e-6", check=False), "started with other settings",
                   "--lr 1e-06 -> 5e-06")
    one_line_error(cli_in_process(*args, check=False), "holds a finished run")
    assert digests(out) == before


def test_resuming_an_unfinished_run_with_other_settings_is_refused(demo_cache, tmp_path):
    out = tmp_path / "run"
    args = ("train", "--cache", demo_cache, "--out", out, "--batch-size", 4, "--save-every", 1, "--no-progress")
    cli_in_process(*args, "--max-steps", 2)
    (out / S.RunLayout.SUMMARY).unlink()  # as if killed after its checkpoint at step 1
    before = digests(out)
    one_line_error(cli_in_process(*args, "--max-steps", 2, "--resume", "--beta", "0.2", check=False),
                   "started with other settings", "--beta 0.1 -> 0.2")
    assert digests(out) == before
    proc = cli_in_process(*args, "--max-steps", 2, "--resume", "--log-every", 5)  # reporting options may change
    assert "trained 2 steps" in proc.stdout


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_second_writer_of_a_run_or_sweep_folder_says_who_holds_it(demo_cache, tmp_path, command):
    out = tmp_path / "f"
    out.mkdir()
    lock = S.RunLayout.LOCK if command == "train" else S.SweepLayout.LOCK
    args = (("train", "--cache", demo_cache, "--out", out, "--max-steps", 1, "--no-progress") if command == "train"
            else ("sweep", "--cache", demo_cache, "--out", out, "--max-steps", 1, "--lr", "1e-6"))
    with open(out / lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("pid 4242 on testhost, since now")
        f.flush()
        one_line_error(cli_in_process(*args, check=False), "is writing this folder" if command == "train" else "another sweep",
                       "pid 4242 on testhost")
    assert [p.name for p in out.iterdir()] == [lock]  # nothing written
    cli_in_process(*args)  # released: it runs, and removes its lock file
    assert not (out / lock).exists()
