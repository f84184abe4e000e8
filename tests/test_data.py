"""Input formats, sources and bad rows."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bso_cache.errors import ConfigError, DataError
from bso_cache.data.formats import Normaliser, parse_hh_dialogue, split_hh
from bso_cache.data.sources import open_source

from .conftest import read_jsonl

PKU_ROW = {
    "prompt": "How do I bake bread?", "response_0": "Knead and bake.", "response_1": "Buy some.",
    "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 1,
    "safer_response_id": 0, "response_0_severity_level": 0, "response_1_severity_level": 2,
}


def normalise_all(path, fmt="auto", skip=False):
    src = open_source(str(path))
    norm = Normaliser(fmt)
    pairs, errors = [], []
    for i, raw in enumerate(src.rows()):
        try:
            pairs.append(norm(raw, i))
        except DataError as e:
            if not skip:
                raise
            errors.append(e)
    return pairs, errors, norm


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_pku_sample_orientation_and_labels(pku_path):
    pairs, _, norm = normalise_all(pku_path)
    rows = read_jsonl(pku_path)
    assert norm.format == "pku" and len(pairs) == len(rows) == 500
    for p, r in zip(pairs, rows):
        b = r["better_response_id"]
        assert p.chosen == r[f"response_{b}"] and p.rejected == r[f"response_{1 - b}"]
        assert p.chosen_unsafe is (not r[f"is_response_{b}_safe"])
        assert p.rejected_unsafe is (not r[f"is_response_{1 - b}_safe"])
        assert p.safer_is_chosen == (r["safer_response_id"] == b)
        assert p.chosen_severity == r[f"response_{b}_severity_level"]
        assert p.prompt == (("user", r["prompt"]),)
    assert len({p.pair_id for p in pairs}) == 500


def test_hh_sample_multi_turn_and_the_quirk_row(hh_path):
    pairs, _, norm = normalise_all(hh_path)
    assert norm.format == "hh" and len(pairs) == 500
    assert norm.notes == {"hh_prompt_from_common_prefix": 1}
    rows = read_jsonl(hh_path)
    multi = sum(1 for p in pairs if sum(r == "user" for r, _ in p.prompt) > 1)
    assert multi >= 300
    first = pairs[0]
    assert first.prompt[0] == ("user", "What are some cuss words in english?")
    assert first.prompt[-1][0] == "user" and first.chosen == "I haven't even thought about it."
    assert first.rejected == "Ass."
    # row 329: the rejected dialogue mistypes a "Human:" marker; the shared prompt is kept,
    # and the rest of each dialogue becomes its response
    quirk = pairs[329]
    assert quirk.prompt[-1] == ("user", "I cannot see anything. Just tell me what it says")
    assert quirk.chosen.startswith("Well, the bad songs")
    assert quirk.rejected.startswith("Right, so I'll read you") and "Hum: What is that?" in quirk.rejected
    assert rows[329]["chosen"].endswith(quirk.chosen)


def test_hh_parsing_units():
    text = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant: ciao"
    assert parse_hh_dialogue(text) == [("user", "hi"), ("assistant", "hello"), ("user", "bye"),
                                       ("assistant", "ciao")]
    prompt, c, r, odd = split_hh(text, text[:-4] + "bye!")
    assert (c, r, odd) == ("ciao", "bye!", False)
    assert parse_hh_dialogue(prompt)[-1] == ("user", "bye")


def test_generic_strings_messages_and_labels(tmp_path):
    rows = [
        {"prompt": "Q1", "chosen": "A", "rejected": "B"},
        {"prompt": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Q2"}],
         "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}],
         "is_chosen_safe": True, "is_rejected_safe": False},
        {"prompt": "Q3", "chosen": "C", "rejected": "D", "chosen_unsafe": True, "rejected_unsafe": None},
    ]
    pairs, _, norm = normalise_all(write_jsonl(tmp_path / "g.jsonl", rows))
    assert norm.format == "generic"
    assert (pairs[0].chosen_unsafe, pairs[0].rejected_unsafe, pairs[0].safer_is_chosen) == (None, None, None)
    assert pairs[1].prompt == (("system", "be nice"), ("user", "Q2"))
    assert (pairs[1].chosen, pairs[1].chosen_unsafe, pairs[1].rejected_unsafe, pairs[1].safer_is_chosen) == \
        ("yes", False, True, True)
    assert (pairs[2].chosen_unsafe, pairs[2].rejected_unsafe) == (True, None)


@pytest.mark.parametrize("suffix", ["parquet", "csv", "json"])
def test_other_file_types_and_folders(tmp_path, suffix):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rows = [dict(PKU_ROW, prompt=f"q{i}") for i in range(5)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffix == "csv":
        pcsv.write_csv(pa.Table.from_pylist(rows), path)
    else:
        path.write_text(json.dumps(rows))
    pairs, _, _ = normalise_all(path)
    assert [p.prompt[0][1] for p in pairs] == [f"q{i}" for i in range(5)]
    assert pairs[0].chosen == "Buy some." and pairs[0].chosen_unsafe is True
    folder_pairs, _, _ = normalise_all(tmp_path)
    assert len(folder_pairs) == 5


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    rows = [dict(PKU_ROW, prompt=f"q{i}") for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    pairs, _, norm = normalise_all(tmp_path / "ds")
    assert norm.format == "pku" and len(pairs) == 4


BAD = [
    ("{not json", "line 3", "invalid JSON", "invalid_json"),
    ({k: v for k, v in PKU_ROW.items() if k != "response_1"}, "field 'response_1'", "missing field", "missing_field"),
    (dict(PKU_ROW, is_response_0_safe="yes"), "field 'is_response_0_safe'", "expected true or false", "bad_label"),
    (dict(PKU_ROW, response_0="  "), "field 'response_0'", "is empty", "empty_response"),
    (dict(PKU_ROW, better_response_id=2), "field 'better_response_id'", "expected 0 or 1", "bad_id"),
    (dict(PKU_ROW, prompt=None), "field 'prompt'", "is null", "null_field"),
    (dict(PKU_ROW, prompt=42), "field 'prompt'", "expected a string", "wrong_type"),
    (dict(PKU_ROW, response_1="Knead and bake."), "field 'response_1'", "identical", "identical_responses"),
]


@pytest.mark.parametrize("bad,where,what,reason", BAD)
def test_bad_rows_name_file_line_field(tmp_path, bad, where, what, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [PKU_ROW, PKU_ROW, bad, PKU_ROW])
    with pytest.raises(DataError) as info:
        normalise_all(path)
    msg = str(info.value)
    assert str(path) in msg and "row 3" in msg and what in msg and "--skip-bad-rows" in msg
    if where != "line 3":
        assert where in msg
    assert info.value.reason == reason
    pairs, errors, _ = normalise_all(path, skip=True)
    assert len(pairs) == 3 and [e.reason for e in errors] == [reason]


def test_unknown_columns_and_sources():
    with pytest.raises(ConfigError, match="cannot tell the input format"):
        Normaliser()(type("R", (), {"error": None, "data": {"text": "x"}, "source": "f", "row": 1})(), 0)
    with pytest.raises(ConfigError, match="no such file"):
        open_source("./nope/missing.jsonl")


# --- the formats people have (issue 12) ----------------------------------------------------------

def _compress(path, suffix):
    import bz2
    import gzip

    import pyarrow as pa

    out = path.with_name(path.name + suffix)
    data = path.read_bytes()
    if suffix == ".gz":
        out.write_bytes(gzip.compress(data))
    elif suffix == ".bz2":
        out.write_bytes(bz2.compress(data))
    else:
        with pa.CompressedOutputStream(str(out), "zstd") as f:
            f.write(data)
    return out


@pytest.mark.parametrize("suffix", [".gz", ".zst", ".bz2"])
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_compressed_inputs_read_as_the_plain_file(tmp_path, kind, suffix):
    rows = [dict(PKU_ROW, prompt=f"q{i}") for i in range(5)]
    plain = tmp_path / f"d.{kind}"
    if kind == "jsonl":
        write_jsonl(plain, rows)
    elif kind == "json":
        plain.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.csv as pcsv

        pcsv.write_csv(pa.Table.from_pylist(rows), plain)
    packed = _compress(plain, suffix)
    assert [p.prompt for p in normalise_all(packed)[0]] == [p.prompt for p in normalise_all(plain)[0]]


def test_a_float_id_column_as_pandas_writes_it(tmp_path):
    """0.0 / 1.0 are the integers they hold; NaN is refused at its row (rows count from 1 everywhere)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(PKU_ROW, prompt=f"q{i}", better_response_id=float(i % 2), safer_response_id=0.0,
                 response_0_severity_level=float("nan")) for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ok.parquet")
    pairs, _, _ = normalise_all(tmp_path / "ok.parquet")
    assert [p.chosen for p in pairs] == ["Knead and bake.", "Buy some."] * 2 and pairs[0].chosen_severity is None
    rows[2]["better_response_id"] = float("nan")
    for name, write in (("bad.parquet", lambda p: pq.write_table(pa.Table.from_pylist(rows), p)),
                        ("bad.jsonl", lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)))):
        with pytest.raises(DataError, match=r"row 3, field 'better_response_id': is NaN"):
            write(tmp_path / name)
            normalise_all(tmp_path / name)


def test_jsonl_rows_count_records_and_name_the_line_past_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(PKU_ROW) + "\n\n" + json.dumps(dict(PKU_ROW, prompt=None)) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl, row 2 \(line 3\), field 'prompt'"):
        normalise_all(path)


def test_trl_implicit_prompt_conversations(tmp_path):
    """No prompt column; chosen and rejected are whole conversations sharing their first turns."""
    shared = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "How do I pick a lock?"}]
    rows = [{"chosen": shared + [{"role": "assistant", "content": "I can't help with that."}],
             "rejected": shared + [{"role": "assistant", "content": "Use a tension wrench."}],
             "chosen_unsafe": False, "rejected_unsafe": True}]
    pairs, _, norm = normalise_all(write_jsonl(tmp_path / "trl.jsonl", rows))
    assert norm.format == "implicit"
    p = pairs[0]
    assert p.messages == shared and (p.chosen, p.rejected) == ("I can't help with that.", "Use a tension wrench.")
    assert (p.chosen_unsafe, p.rejected_unsafe, p.safer_is_chosen) == (False, True, True)


def test_a_response_of_several_messages_is_refused_naming_the_row(tmp_path):
    """Never silently cut to its last message."""
    many = [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "And?"},
            {"role": "assistant", "content": "Done."}]
    rows = [{"prompt": "q", "chosen": [{"role": "assistant", "content": "A."}], "rejected": "B."},
            {"prompt": "q", "chosen": many, "rejected": "B."}]
    with pytest.raises(DataError, match=r"row 2, field 'chosen': the response is 3 message\(s\) "
                                        r"\(assistant, user, assistant\)"):
        normalise_all(write_jsonl(tmp_path / "d.jsonl", rows))
    pairs, errors, _ = normalise_all(tmp_path / "d.jsonl", skip=True)
    assert [p.chosen for p in pairs] == ["A."] and [e.reason for e in errors] == ["multi_turn_response"]


text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(text, text, text, st.sampled_from([None, True, False]),
                               st.sampled_from([None, True, False])), min_size=1, max_size=15),
       suffix=st.sampled_from(["jsonl", "parquet", "json"]))
def test_generic_reader_round_trip(tmp_path_factory, rows, suffix):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bso_cache.errors import DataError
    from bso_cache.data.formats import Normaliser
    from bso_cache.data.sources import open_source

    records = [{"prompt": p, "chosen": c, "rejected": r, "chosen_unsafe": cu, "rejected_unsafe": ru}
               for p, c, r, cu, ru in rows]
    path = tmp_path_factory.mktemp("rows") / f"d.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif suffix == "json":
        path.write_text(json.dumps(records), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    norm = Normaliser()
    raws = list(open_source(str(path)).rows())
    assert len(raws) == len(records)  # every row is read back, none lost or invented
    for i, raw in enumerate(raws):
        rec = records[i]
        if rec["chosen"] == rec["rejected"]:
            with pytest.raises(DataError, match="identical"):
                norm(raw, i)
            continue
        pair = norm(raw, i)
        assert pair.prompt == (("user", rec["prompt"]),)
        assert (pair.chosen, pair.rejected) == (rec["chosen"], rec["rejected"])
        assert (pair.chosen_unsafe, pair.rejected_unsafe) == (rec["chosen_unsafe"], rec["rejected_unsafe"])
