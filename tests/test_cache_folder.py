"""The cache folder as a user meets it: portable across working folders and spellings, one build
at a time, damaged, truncated or edited caches named in one line, full disks and unwritable
folders refused before any work, `--overwrite` that checks before it deletes, and a folder that
opens directly in the usual Parquet readers."""

from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest

from bso_cache import schemas as S
from bso_cache.cache import Cache

from .conftest import cli, cli_in_process, digests, one_line_error


def test_caches_are_portable_across_working_directories_and_spellings(demo_assets, tmp_path):
    """Built with relative paths from one folder, trained from another, rebuilt with absolute
    paths: the same cache; a reference that is truly gone says --policy fixes it."""
    work = tmp_path / "a"
    work.mkdir()
    shutil.copytree(demo_assets["model"], work / "model")
    shutil.copy(demo_assets["train"], work / "train.jsonl")
    cli("build", "--model", "model", "--data", "train.jsonl", "--out", "cache", "--max-length", 128,
           "--no-progress", cwd=work)
    elsewhere = tmp_path / "b"
    elsewhere.mkdir()
    cli("train", "--cache", work / "cache", "--out", "run", "--max-steps", 1, "--batch-size", 4,
           "--no-progress", cwd=elsewhere)
    again = cli("build", "--model", work / "model", "--data", (work / "train.jsonl").resolve(),
                   "--out", work / "cache", "--max-length", 128, "--no-progress", cwd=elsewhere)
    assert "nothing to do" in again.stderr
    moved = tmp_path / "moved"
    shutil.move(str(work), str(moved))
    proc = cli("train", "--cache", moved / "cache", "--out", "run2", "--max-steps", 1, check=False, cwd=elsewhere)
    one_line_error(proc, "reference model", "--policy")
    cli("train", "--cache", moved / "cache", "--out", "run3", "--max-steps", 1, "--batch-size", 4,
           "--policy", moved / "model", "--no-progress", cwd=elsewhere)


def test_empty_build_is_an_error_and_leaves_nothing(demo_assets, tmp_path):
    proc = cli_in_process("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--out", tmp_path / "c",
               "--max-length", 5, "--no-progress", check=False)
    one_line_error(proc, "no pair was written", "overlong 96", "--max-length")
    assert not (tmp_path / "c").exists()


def test_a_shard_of_only_bad_rows_is_counted_with_skip_bad_rows(demo_assets, tmp_path):
    rows = demo_assets["train"].read_text().splitlines()[:10] + ['{"prompt": "x", "chosen": "y"}'] * 10
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cli_in_process("build", "--model", demo_assets["model"], "--data", data, "--out", tmp_path / "c", "--rows-per-shard", 10,
        "--skip-bad-rows", "--max-length", 128, "--no-progress")
    m = json.loads((tmp_path / "c" / S.MANIFEST_NAME).read_text())
    assert m["rows"] == {"input": 20, "written": 10, "dropped": {"missing_field": 10}}
    assert [s["rows"] for s in m["shards"]] == [10, 0]
    assert not (tmp_path / "c" / S.BUILD_STATE_NAME).exists()


def test_out_naming_a_file_is_one_line(demo_assets, demo_cache, tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    one_line_error(cli_in_process("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--out", afile,
                       check=False), "is a file")
    one_line_error(cli_in_process("train", "--cache", demo_cache, "--out", afile, check=False), "is a file")
    assert afile.read_text() == "x"


def test_a_full_disk_while_writing_a_shard_is_one_error_and_leaves_no_temporary(demo_assets, tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    from bso_cache.cache.build import build_cache
    from bso_cache.config import BuildConfig
    from bso_cache.errors import CacheError

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(CacheError, match="part-00000.parquet: cannot be written .No space left on device.*resume"):
        build_cache(BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]),
                                out=str(tmp_path / "c"), max_length=128, progress=False), log=lambda s: None)
    assert not list((tmp_path / "c").glob("*.tmp"))


def damaged_copy(demo_cache, tmp_path, how):
    copy = tmp_path / f"damaged-{how}"
    shutil.copytree(demo_cache, copy)
    shard = copy / "part-00001.parquet"
    if how == "missing":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("how", ["missing", "flipped"])
def test_every_command_on_a_damaged_cache_is_one_line(demo_assets, demo_cache, tmp_path, how):
    bad = damaged_copy(demo_cache, tmp_path, how)
    commands = [("inspect", "--cache", bad, "--verify"), ("verify", "--cache", bad),
                ("train", "--cache", bad, "--out", tmp_path / f"r-{how}", "--max-steps", 1),
                ("eval", "--model", demo_assets["model"], "--cache", bad)]
    if how == "missing":
        commands.append(("inspect", "--cache", bad))  # without --verify too: the shard's presence is always checked
    for args in commands:
        one_line_error(cli_in_process(*args, check=False), "part-00001.parquet")


def test_any_edit_of_the_manifest_is_detected(demo_assets, demo_cache, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(demo_cache, copy)
    path = copy / S.MANIFEST_NAME
    for field, value in (("tokenization", {"max_length": 4096}), ("stats", {"tokens": 1})):
        m = json.loads(path.read_text())
        m[field] = {**m[field], **value}
        path.write_text(json.dumps(m))
        for args in (("verify", "--cache", copy), ("train", "--cache", copy, "--out", tmp_path / "r", "--max-steps", 1)):
            one_line_error(cli_in_process(*args, check=False), "was edited after the build", "digest")
        shutil.copy(demo_cache / S.MANIFEST_NAME, path)
    cli_in_process("verify", "--cache", copy)  # the original manifest reads again


def test_a_second_build_into_the_same_folder_says_who_holds_it(demo_assets, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    with open(out / S.BUILD_LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("pid 4242 on testhost, since now")
        f.flush()
        proc = cli_in_process("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--out", out,
                   "--max-length", 128, "--no-progress", check=False)
    one_line_error(proc, "another build is writing", "pid 4242 on testhost")
    assert not (out / S.MANIFEST_NAME).exists()
    cli_in_process("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--out", out, "--max-length", 128,
        "--no-progress")  # the lock released, the build goes through and removes its lock file
    assert not (out / S.BUILD_LOCK_NAME).exists()


def test_the_cache_folder_opens_directly_in_the_usual_readers(demo_cache):
    """The shards are the folder's only visible files (the manifest is .manifest.json)."""
    import polars as pl
    import pyarrow.parquet as pq

    n = json.loads((demo_cache / S.MANIFEST_NAME).read_text())["rows"]["written"]
    assert pq.read_table(demo_cache).num_rows == n
    assert pl.scan_parquet(f"{demo_cache}/*.parquet").select(pl.len()).collect().item() == n
    datasets = pytest.importorskip("datasets")
    assert datasets.load_dataset("parquet", data_dir=str(demo_cache), split="train").num_rows == n
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql(f"select count(*) from read_parquet('{demo_cache}/*.parquet')").fetchall()[0][0] == n


def test_a_first_release_cache_is_refused_by_name_and_no_manifest_skips_its_digest(demo_cache, tmp_path):
    """A cache of 0.1.0 (`manifest.json`, schema_version 1, no digest) is refused in one line saying
    what it is; a current manifest that claims that release still needs its digest."""
    old = tmp_path / "v1"
    shutil.copytree(demo_cache, old)
    m = json.loads((old / S.MANIFEST_NAME).read_text())
    (old / S.MANIFEST_NAME).unlink()
    (old / S.MANIFEST_NAME_V1).write_text(json.dumps({**m, "schema_version": 1, "bso_cache_version": "0.1.0"}))
    for args in (("verify", "--cache", old), ("inspect", "--cache", old),
                 ("train", "--cache", old, "--out", tmp_path / "r", "--max-steps", 1, "--no-progress")):
        one_line_error(cli_in_process(*args, check=False), "bso-cache 0.1.0", "rebuild it")
    claims = tmp_path / "claims"
    shutil.copytree(demo_cache, claims)
    m.update(bso_cache_version="0.1.0")
    m.pop("digest")
    (claims / S.MANIFEST_NAME).write_text(json.dumps(m))
    one_line_error(cli_in_process("verify", "--cache", claims, check=False), "'digest' is missing")


def test_caches_and_runs_never_nest_and_overwrite_checks_before_it_deletes(demo_assets, demo_cache, tmp_path):
    """A run folder inside a cache (or a cache inside a run) is refused up front; `build --overwrite`
    of a cache folder holding something no build wrote refuses before removing anything."""
    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    one_line_error(cli_in_process("train", "--cache", cache, "--out", cache / "run", "--max-steps", 1, "--no-progress",
                       check=False), "is inside the cache", "choose a folder outside it")
    assert not (cache / "run").exists()
    one_line_error(cli_in_process("sweep", "--cache", cache, "--out", cache, "--max-steps", 1, check=False), "is inside the cache")
    run = tmp_path / "run"
    cli_in_process("train", "--cache", cache, "--out", run, "--max-steps", 1, "--batch-size", 4, "--no-progress")
    build = ("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--max-length", 128,
             "--no-progress")
    one_line_error(cli_in_process(*build, "--out", run / "c", check=False), "is inside the training run")
    assert not (run / "c").exists()
    (cache / "notes.txt").write_text("mine")
    before = digests(cache)
    one_line_error(cli_in_process(*build, "--out", cache, "--overwrite", "--batch-size", 2, check=False),
                   "holds notes.txt, which no build wrote", "nothing was removed")
    assert digests(cache) == before


@pytest.fixture
def unwritable(tmp_path):
    """A folder nothing can be written into, root included (mode 555 does not stop root): immutable."""
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_an_unwritable_out_is_one_line_before_any_work(demo_assets, demo_cache, unwritable, tmp_path):
    run = tmp_path / "run"
    cli_in_process("train", "--cache", demo_cache, "--out", run, "--max-steps", 1, "--batch-size", 4, "--no-progress")
    for args in (("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--out", unwritable / "c"),
                 ("build", "--model", demo_assets["model"], "--data", demo_assets["train"],
                  "--out", unwritable / "a" / "b"),
                 ("train", "--cache", demo_cache, "--out", unwritable / "run", "--max-steps", 1),
                 ("sweep", "--cache", demo_cache, "--out", unwritable / "sw", "--max-steps", 1, "--lr", "1e-6"),
                 ("eval", "--model", run, "--cache", demo_cache, "--results", unwritable / "e.json"),
                 ("report", run, "--out", unwritable / "plots")):
        proc = cli_in_process(*args, check=False)
        option = "--results" if "--results" in args else "--out"
        one_line_error(proc, f"{option} {args[args.index(option) + 1]}: cannot be written")
        assert "step-0 check" not in proc.stderr and "re-scored" not in proc.stderr  # nothing ran first
    assert list(unwritable.iterdir()) == []


def test_a_build_that_drops_most_of_its_input_says_why_and_what_to_change(demo_assets, tmp_path):
    args = ("build", "--model", demo_assets["model"], "--data", demo_assets["train"], "--no-progress")
    proc = cli_in_process(*args, "--out", tmp_path / "short", "--max-length", 40)
    assert proc.returncode == 0
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "were dropped, most as overlong" in warning[0] and "--max-length 40" in warning[0]
    assert "--overlong truncate" in warning[0]
    proc = cli_in_process(*args, "--out", tmp_path / "full", "--max-length", 128)  # nothing (or little) dropped: no warning
    assert "warning:" not in proc.stderr


def test_the_write_probe_survives_another_rank_removing_the_folder_it_made(tmp_path, monkeypatch):
    """Under torchrun every rank probes --out; a rank that made the folder removes it after its
    probe, possibly between another rank's mkdir and its probe (seen as a flaky 2-rank build)."""
    import tempfile

    from bso_cache.io.files import require_writable

    real, calls = tempfile.mkstemp, []

    def racing_mkstemp(*args, dir=None, **kwargs):
        calls.append(dir)
        if len(calls) == 1:  # the other rank's cleanup lands first
            os.rmdir(dir)
            raise FileNotFoundError(2, "No such file or directory")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", racing_mkstemp)
    require_writable(tmp_path / "new" / "cache", "--out")
    assert len(calls) == 2 and not (tmp_path / "new").exists()  # what the probe made is removed again


def test_missing_and_truncated_shards_are_named(demo_cache, tmp_path):
    import shutil

    from bso_cache.errors import CacheError

    copy = tmp_path / "c"
    shutil.copytree(demo_cache, copy)
    p = copy / "part-00001.parquet"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CacheError, match="part-00001.parquet: size"):
        Cache.open(copy)
    p.unlink()
    with pytest.raises(CacheError, match="part-00001.parquet: shard listed in the manifest is missing"):
        Cache.open(copy)


def _forged(demo_cache, tmp_path, name: str, edit):
    """A copy of the cache whose second shard's row 20 (past the first batch) is edited by `edit(table,
    row)`, with the shard's checksum and the manifest's digest recomputed: what a sender can do."""
    import pyarrow.parquet as pq

    from bso_cache.hashing import file_sha256

    bad = tmp_path / name
    shutil.copytree(demo_cache, bad)
    manifest = json.loads((bad / S.MANIFEST_NAME).read_text())
    shard = manifest["shards"][1]
    path = bad / shard["file"]
    table = edit(pq.read_table(path), 20)
    pq.write_table(table, path)
    shard["sha256"], shard["bytes"] = file_sha256(path), path.stat().st_size
    manifest["digest"] = S.manifest_digest(manifest)
    (bad / S.MANIFEST_NAME).write_text(json.dumps(manifest))
    return bad


def _set(column: str, value):
    import pyarrow as pa

    def edit(table, row):
        values = table[column].to_pylist()
        values[row] = value
        i = table.schema.get_field_index(column)
        return table.set_column(i, table.schema.field(i), pa.array(values, type=table.schema.field(i).type))
    return edit


@pytest.mark.parametrize("name,edit,needle", [
    ("positive", _set(S.REF_CHOSEN_LOGP, 300.0), "field 'ref_chosen_logp' is 300.0, not a log-probability"),
    ("nan", _set(S.REF_REJECTED_LOGP, float("nan")), "field 'ref_rejected_logp' is nan"),
    ("past-vocab", _set(S.CHOSEN_IDS, [5, 10 ** 6]), "field 'chosen_ids' holds token id 1000000, outside"),
    ("negative-id", _set(S.PROMPT_IDS, [-3, 4]), "field 'prompt_ids' holds token id -3"),
    ("empty", _set(S.REJECTED_IDS, []), "field 'rejected_ids' is empty"),
    ("too-long", _set(S.PROMPT_IDS, [5] * 5000), "past the manifest's max_length 128"),
])
def test_a_forged_row_past_the_first_batch_is_refused_naming_it(demo_cache, tmp_path, name, edit, needle):
    """Checksums and digest recomputed: only the values can tell. Train refuses the row (one line,
    the shard, the row, the field), before it reaches the model, and so do eval and verify."""
    bad = _forged(demo_cache, tmp_path, name, edit)
    args = ("--max-steps", 50, "--batch-size", 8, "--no-progress", "--no-shuffle")
    err = one_line_error(cli_in_process("train", "--cache", bad, "--out", tmp_path / "r", *args, check=False),
                         "part-", "row 20", needle)
    assert "rebuild the cache" in err
    one_line_error(cli_in_process("verify", "--cache", bad, "--sample", 200, check=False), "row 20", needle)


def test_a_cache_can_be_pinned_by_its_digest_and_no_shard_lives_outside_it(demo_cache, tmp_path):
    """inspect prints the digest; train, eval and verify --expect-digest refuse another one and take
    the right one; a shard that is a symlink to a file outside the cache is refused."""
    digest = json.loads((demo_cache / S.MANIFEST_NAME).read_text())["digest"]
    assert f"digest     {digest}" in cli_in_process("inspect", "--cache", demo_cache).stdout
    other = "sha256:" + "0" * 64
    run = ("--out", tmp_path / "r", "--max-steps", 1, "--batch-size", 4, "--no-progress")
    one_line_error(cli_in_process("train", "--cache", demo_cache, *run, "--expect-digest", other, check=False),
                   f"its manifest digest is {digest}, not the {other}")
    one_line_error(cli_in_process("verify", "--cache", demo_cache, "--expect-digest", other, check=False),
                   "--expect-digest")
    one_line_error(cli_in_process("train", "--cache", demo_cache, *run, "--expect-digest", "abc", check=False),
                   "--expect-digest abc: a manifest digest is sha256:")
    cli_in_process("train", "--cache", demo_cache, *run, "--expect-digest", digest)
    linked = tmp_path / "linked"
    shutil.copytree(demo_cache, linked)
    first = json.loads((linked / S.MANIFEST_NAME).read_text())["shards"][0]["file"]
    outside = tmp_path / "outside.parquet"
    (linked / first).rename(outside)
    (linked / first).symlink_to(outside)
    for command in ("verify", "inspect"):
        one_line_error(cli_in_process(command, "--cache", linked, check=False), "outside the cache folder")
