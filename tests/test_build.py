"""`bso-cache build`: the cache contract, accounting, exact numbers, resume and refusals."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from bso_cache import schemas as S
from bso_cache.cache.build import build_cache
from bso_cache.cache import Cache, read_manifest
from bso_cache.config import BuildConfig
from bso_cache.errors import CacheError, DataError

from .conftest import read_jsonl


def read_all(cache_dir):
    cache = Cache.open(cache_dir)
    return pq.read_table([str(p) for p in cache.shards]).to_pylist() if len(cache.shards) > 1 else \
        pq.read_table(str(cache.shards[0])).to_pylist()


def rows_of(cache_dir):
    import pyarrow as pa

    cache = Cache.open(cache_dir)
    return pa.concat_tables([pq.read_table(p) for p in cache.shards]).to_pylist()


def test_shard_schema_is_pinned():
    """The on-disk contract: changing it needs a schema version bump (and this test)."""
    assert S.SCHEMA_VERSION == 2 and S.MANIFEST_NAME == ".manifest.json"
    got = [(f.name, str(f.type), f.nullable) for f in S.shard_schema()]
    assert got == [
        ("pair_id", "string", False), ("source_index", "int64", False),
        ("prompt_ids", "list<item: int32>", False), ("chosen_ids", "list<item: int32>", False),
        ("rejected_ids", "list<item: int32>", False), ("ref_chosen_logp", "double", False),
        ("ref_rejected_logp", "double", False), ("chosen_unsafe", "bool", True),
        ("rejected_unsafe", "bool", True), ("safer_is_chosen", "bool", True),
        ("chosen_severity", "int8", True), ("rejected_severity", "int8", True), ("truncated", "bool", False),
    ]


def test_pku_build_contract_accounting_and_labels(pku_cache, pku_path, tinystories):
    from transformers import AutoTokenizer

    manifest = read_manifest(pku_cache).to_json()
    for key in S.MANIFEST_REQUIRED:
        assert key in manifest
    rows = manifest["rows"]
    assert rows["input"] == 500 and rows["written"] + sum(rows["dropped"].values()) == 500
    assert set(rows["dropped"]) <= {"overlong"}
    assert manifest["reference"]["weights_digest"].startswith("sha256:")
    assert manifest["tokenization"]["max_length"] == 512
    assert manifest["reference_pass"] == {"dtype": "float32", "device_kind": "cpu"}
    assert all(s["sha256"].startswith("sha256:") and s["rows"] >= 0 for s in manifest["shards"])
    table = rows_of(pku_cache)
    assert len(table) == rows["written"]
    assert len({r[S.PAIR_ID] for r in table}) == len(table)
    data = read_jsonl(pku_path)
    tok = AutoTokenizer.from_pretrained(str(tinystories))
    for r in table:
        src = data[r[S.SOURCE_INDEX]]
        b = src["better_response_id"]
        assert r[S.CHOSEN_UNSAFE] is (not src[f"is_response_{b}_safe"])
        assert r[S.REJECTED_UNSAFE] is (not src[f"is_response_{1 - b}_safe"])
        assert r[S.SAFER_IS_CHOSEN] == (src["safer_response_id"] == b)
        assert len(r[S.PROMPT_IDS]) + max(len(r[S.CHOSEN_IDS]), len(r[S.REJECTED_IDS])) <= 512
    for r in table[:40]:
        src = data[r[S.SOURCE_INDEX]]
        b = src["better_response_id"]
        assert tok.decode(r[S.CHOSEN_IDS], skip_special_tokens=True).strip() == src[f"response_{b}"].strip()


def test_cached_logps_equal_unbatched_recomputation(pku_cache, tinystories):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tinystories)).eval()
    table = rows_of(pku_cache)
    worst = 0.0
    with torch.no_grad():
        for r in table[::10]:
            for ids, key in ((S.CHOSEN_IDS, S.REF_CHOSEN_LOGP), (S.REJECTED_IDS, S.REF_REJECTED_LOGP)):
                seq = torch.tensor([r[S.PROMPT_IDS] + r[ids]])
                logits = model(input_ids=seq).logits.float()
                lp = torch.log_softmax(logits[0, :-1], -1).gather(1, seq[0, 1:, None]).squeeze(1)
                expected = lp[len(r[S.PROMPT_IDS]) - 1:].double().sum().item()
                worst = max(worst, abs(expected - r[key]))
    assert worst < 1e-3


def test_hh_build_and_rerun_is_a_noop(hh_path, tinystories, tmp_path):
    cfg = BuildConfig(model=str(tinystories), data=str(hh_path), out=str(tmp_path / "c"), max_length=256,
                      overlong="truncate", rows_per_shard=250, progress=False)
    m1 = build_cache(cfg, log=lambda s: None)
    assert m1.rows["input"] == 500
    assert m1.rows["written"] + sum(m1.rows["dropped"].values()) == 500
    assert m1.notes == {"hh_prompt_from_common_prefix": 1}
    table = rows_of(tmp_path / "c")
    assert all(r[S.CHOSEN_UNSAFE] is None for r in table)
    assert any(r[S.TRUNCATED] for r in table)
    logs = []
    m2 = build_cache(cfg, log=logs.append)
    assert m2.shards == m1.shards and "already complete" in logs[0]


def test_other_settings_into_an_existing_cache_are_refused(demo_assets, demo_cache):
    cfg = BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]), out=str(demo_cache),
                      max_length=100, batch_size=8, rows_per_shard=40, progress=False)
    with pytest.raises(CacheError, match="tokenization.max_length.*--overwrite"):
        build_cache(cfg, log=lambda s: None)


def test_unfinished_build_resumes_to_the_same_cache(demo_assets, demo_cache, tmp_path):
    import shutil

    cfg = BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]), out=str(tmp_path / "c"),
                      max_length=128, batch_size=3, rows_per_shard=40, progress=False)
    build_cache(cfg, log=lambda s: None)
    # simulate a build killed after its first shard: remove the manifest, restore a sidecar state
    BUILD_STATE = S.BUILD_STATE_NAME

    out = tmp_path / "c"
    manifest = json.loads((out / S.MANIFEST_NAME).read_text())
    (out / S.MANIFEST_NAME).unlink()
    shutil.copy(out / "part-00001.parquet", tmp_path / "keep.parquet")
    for name in ("part-00001.parquet", "part-00002.parquet"):
        (out / name).unlink()
    (out / BUILD_STATE).write_text(json.dumps({k: manifest[k] for k in S.BUILD_IDENTITY_KEYS}))
    first = manifest["shards"][0]
    (out / "part-00000.json").write_text(json.dumps({
        "shard": {k: first[k] for k in ("file", "rows", "bytes", "sha256")}, "input_rows": first["input_rows"],
        "dropped": {}, "notes": {}, "reference": None, "stats": {"seconds": 1.0, "tokens": 1, "padded_tokens": 1}}))
    with pytest.raises(CacheError, match="unfinished build"):
        Cache.open(out)
    resumed = build_cache(cfg, log=lambda s: None)
    assert [s.sha256 for s in resumed.shards] == [s["sha256"] for s in manifest["shards"]]
    # and equals a build with another batch size, up to float noise in the log-probs
    for a, b in zip(rows_of(out), rows_of(demo_cache), strict=True):
        assert {k: a[k] for k in (S.PAIR_ID, S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS)} == \
            {k: b[k] for k in (S.PAIR_ID, S.PROMPT_IDS, S.CHOSEN_IDS, S.REJECTED_IDS)}
        assert abs(a[S.REF_CHOSEN_LOGP] - b[S.REF_CHOSEN_LOGP]) < 1e-4


def test_bad_row_stops_the_build_or_is_counted(demo_assets, tmp_path):
    lines = (demo_assets["train"]).read_text().splitlines()[:20]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:7] + ['{"prompt": "x", "chosen": "y"'] + lines[7:]) + "\n")
    cfg = dict(model=str(demo_assets["model"]), data=str(bad), max_length=128, progress=False)
    with pytest.raises(DataError, match=r"bad.jsonl, row 8: invalid JSON"):
        build_cache(BuildConfig(out=str(tmp_path / "c1"), **cfg), log=lambda s: None)
    m = build_cache(BuildConfig(out=str(tmp_path / "c2"), skip_bad_rows=True, **cfg), log=lambda s: None)
    assert m.rows == {"input": 21, "written": 20, "dropped": {"invalid_json": 1}}


def test_empty_input_is_refused(demo_assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        build_cache(BuildConfig(model=str(demo_assets["model"]), data=str(empty), out=str(tmp_path / "c"),
                                progress=False), log=lambda s: None)


def test_damaged_shard_is_refused_naming_it(demo_cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(demo_cache, copy)
    shard = copy / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="part-00001.parquet: checksum differs"):
        Cache.open(copy)
    manifest = json.loads((copy / S.MANIFEST_NAME).read_text())
    manifest["shards"][0]["file"] = "../../etc/passwd"
    (copy / S.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="outside the cache"):
        Cache.open(copy)
    manifest["schema_version"] = 99
    (copy / S.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="schema_version.*rebuild"):
        Cache.open(copy)


def test_inspect_reports_lazily(pku_cache, monkeypatch):
    """inspect queries the shards through polars' lazy scan: no eager read of a whole table."""
    import polars as pl
    import pyarrow.parquet as pq

    from bso_cache.cache.inspect import inspect_cache

    def eager(*a, **k):
        raise AssertionError("inspect read a whole table eagerly")

    scans = []
    real_scan = pl.scan_parquet
    monkeypatch.setattr(pl, "scan_parquet", lambda *a, **k: scans.append(a) or real_scan(*a, **k))
    for name in ("read_parquet", "read_ipc", "read_csv"):
        monkeypatch.setattr(pl, name, eager)
    monkeypatch.setattr(pq, "read_table", eager)
    monkeypatch.setattr(pq.ParquetFile, "read", eager)
    info = inspect_cache(pku_cache)
    assert scans, "inspect did not use polars.scan_parquet"
    assert sum(info["pair_types"].values()) == info["rows"]["written"]
    assert info["lengths"]["total_max"] <= 512
    assert info["ref_logps"]["chosen_mean"] < 0


def test_degenerate_rows_are_counted_and_the_system_prompt_rule_is_recorded(demo_assets, tmp_path):
    """Rows equal up to whitespace are dropped as identical (counted); repeated rows are kept and
    counted in the notes; --system-prompt goes to conversations without a system message, and the
    manifest says how many got it and how many kept their own."""
    from transformers import AutoTokenizer

    from bso_cache.data.formats import Normaliser
    from bso_cache.data.sources import RawRow
    from bso_cache.data.tokenize import PairTokenizer

    base = read_jsonl(demo_assets["train"])[:6]
    own_system = {**base[1], "prompt": [{"role": "system", "content": "Answer in French."},
                                        {"role": "user", "content": "How do I boil an egg?"}]}
    spacing = {**base[2], "chosen": "Sure,  here it is.\n", "rejected": " Sure, here it is."}
    rows = base + [dict(base[0]), dict(base[0]), own_system, spacing]
    data = tmp_path / "degenerate.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(model=str(demo_assets["model"]), data=str(data), max_length=256, batch_size=4, progress=False,
               system_prompt="Be safe.")
    with pytest.raises(DataError, match="identical up to whitespace") as e:
        build_cache(BuildConfig(out=str(tmp_path / "strict"), **cfg), log=lambda s: None)
    assert "row 10" in str(e.value) and not (tmp_path / "strict" / S.MANIFEST_NAME).exists()
    lines = []
    m = build_cache(BuildConfig(out=str(tmp_path / "c"), skip_bad_rows=True, **cfg), log=lines.append)
    assert m.rows == {"input": 10, "written": 9, "dropped": {"identical_responses": 1}}
    assert m.notes["duplicate_rows"] == 2
    assert m.notes["system_prompt_added"] == 8 and m.notes["system_prompt_not_added_row_has_own"] == 1
    assert any("2 input rows repeat an earlier row" in line for line in lines), lines
    ptok = PairTokenizer(AutoTokenizer.from_pretrained(str(demo_assets["model"])), system_prompt="Be safe.")
    prompts = [ptok.render(Normaliser("generic")(RawRow(str(data), i + 1, r), i))[0]
               for i, r in ((0, base[0]), (8, own_system))]
    assert "Be safe." in prompts[0] and "Be safe." not in prompts[1] and "Answer in French." in prompts[1]


def test_an_empty_chat_template_file_is_refused(demo_assets, tmp_path, model_loads):
    """An empty --chat-template would leave the tokenizer's own template in force while the manifest
    names the file: refused before any model loads, nothing written."""
    from bso_cache.errors import ConfigError

    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="--chat-template .*empty.jinja: the file is empty"):
        build_cache(BuildConfig(model=str(demo_assets["model"]), data=str(demo_assets["train"]),
                                out=str(tmp_path / "c"), template="chat", chat_template=str(empty), progress=False),
                    log=lambda s: None)
    assert model_loads == [] and not (tmp_path / "c").exists()
