"""The synthetic corpus: determinism, fields, person-disjoint splits, file I/O."""

from __future__ import annotations

import json

import pytest

from sau.errors import DataFormatError
from sau.lab.data import FORGET_FRACTIONS, generate, load_qa, write_splits


def _people(rows):
    return {r["person"] for r in rows}


def test_same_seed_byte_identical_files(tmp_path):
    write_splits(generate(seed=7, n_people=30), tmp_path / "a")
    write_splits(generate(seed=7, n_people=30), tmp_path / "b")
    for name in ("forget", "retain", "holdout", "general"):
        a = (tmp_path / "a" / f"{name}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
        assert a.endswith(b"\n") and b"\r" not in a


def test_different_seed_different_people():
    a, b = generate(seed=0, n_people=30), generate(seed=1, n_people=30)
    people_a = _people(a.forget + a.retain + a.holdout)
    people_b = _people(b.forget + b.retain + b.holdout)
    assert people_a != people_b


def test_rows_have_tofu_fields():
    ds = generate(seed=0, n_people=20)
    for rows in ds.splits().values():
        for r in rows:
            assert isinstance(r["question"], str) and r["question"].endswith(("?", "."))
            assert isinstance(r["answer"], str) and r["answer"]
            assert isinstance(r["paraphrased_answer"], str) and r["paraphrased_answer"]
            assert isinstance(r["perturbed_answer"], list) and len(r["perturbed_answer"]) >= 3
            assert r["answer"] not in r["perturbed_answer"]
            assert len(set(r["perturbed_answer"])) == len(r["perturbed_answer"])
            assert "person" in r


def test_answers_are_short():
    ds = generate(seed=0, n_people=20)
    assert max(len(r["answer"].split()) for r in ds.retain) <= 12


@pytest.mark.parametrize("fraction", FORGET_FRACTIONS)
def test_splits_disjoint_and_sized(fraction):
    n_people = 200
    ds = generate(seed=0, n_people=n_people, forget_fraction=fraction)
    forget, retain, holdout = _people(ds.forget), _people(ds.retain), _people(ds.holdout)
    assert not (forget & retain) and not (forget & holdout) and not (retain & holdout)
    assert len(forget) == round(fraction * n_people) == len(holdout)
    assert len(forget) + len(retain) + len(holdout) == n_people
    assert ds.general and all(r["person"] == "" for r in ds.general)


def test_bad_arguments():
    with pytest.raises(ValueError, match="forget_fraction"):
        generate(forget_fraction=0.2)
    with pytest.raises(ValueError, match="n_people"):
        generate(n_people=2)


def test_load_qa_round_trip_jsonl_and_json_list(tmp_path):
    ds = generate(seed=0, n_people=10)
    paths = write_splits(ds, tmp_path)
    assert load_qa(paths["forget"]) == ds.forget
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ds.retain, indent=1), encoding="utf-8")
    assert load_qa(listed) == ds.retain


def test_load_qa_optional_fields(tmp_path):
    path = tmp_path / "user.jsonl"
    path.write_text('{"question": "Q?", "answer": "A."}\n\n', encoding="utf-8")
    assert load_qa(path) == [{"question": "Q?", "answer": "A."}]


def test_load_qa_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Q?", "answer": "A."}\n{"question": oops}\n', encoding="utf-8")
    with pytest.raises(DataFormatError) as info:
        load_qa(path)
    msg = str(info.value)
    assert f"{path}:2" in msg and "\n" not in msg


def test_load_qa_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "Q?", "answer": "A."}\n{"question": "Q?"}\n', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:2: .*answer"):
        load_qa(path)
    listed = tmp_path / "bad.json"
    listed.write_text('[{"question": "Q?", "answer": "A."}, {"answer": "A."}]', encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad\.json \(item 1\).*question"):
        load_qa(listed)


def test_load_qa_missing_file(tmp_path):
    with pytest.raises(DataFormatError, match="nope.jsonl"):
        load_qa(tmp_path / "nope.jsonl")


def test_cli_writes_files(tmp_path, capsys):
    from sau.cli import main

    assert main(["data", "--out", str(tmp_path), "--seed", "2", "--n-people", "20"]) == 0
    assert load_qa(tmp_path / "forget.jsonl") == generate(seed=2, n_people=20).forget
    assert "forget" in capsys.readouterr().out


def test_tofu_scale_corpus_has_20_distinct_facts_per_person():
    ds = generate(seed=0, n_people=20, n_facts=20)
    by_person = {}
    for row in ds.forget + ds.retain + ds.holdout:
        by_person.setdefault(row["person"], []).append(row)
    assert len(by_person) == 20
    for rows in by_person.values():
        assert len(rows) == 20 and len({r["fact"] for r in rows}) == 20
        for r in rows:
            assert len(set(r["perturbed_answer"])) == 3
            assert r["paraphrased_answer"] not in r["perturbed_answer"]
    assert ds.config_dict()["n_facts"] == 20


def test_eight_facts_is_the_original_corpus():
    # Adding n_facts must not change a single row of the default corpus, nor the cache
    # key of models trained on it. The digest is of generate(seed=0) before n_facts existed.
    import hashlib

    rows = json.dumps(generate(seed=0, n_facts=8).splits(), sort_keys=True).encode()
    before = "e10d46e99fff90bdf1cdc52883aea97484f1bc750c70956d75c0e0d7cf7dfc83"
    assert hashlib.sha256(rows).hexdigest() == before
    assert "n_facts" not in generate(seed=3).config_dict()
    with pytest.raises(ValueError, match="n_facts"):
        generate(n_facts=21)
