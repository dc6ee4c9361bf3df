"""Paired comparisons (rag.replication.paired): the exact McNemar test against brute-force enumeration, the choice
of pairs, and the aggregator's paired table from a run folder's predictions."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from rag.replication.aggregate import aggregate
from rag.replication.paired import choose_pairs, compare, load_correct, mcnemar_exact, paired_comparisons


def _brute_force_p(only_a: int, only_b: int) -> float:
    """P(|A - n/2| >= |only_a - n/2|) over all 2^n equally likely ways n discordant questions can fall."""
    n = only_a + only_b
    observed = abs(only_a - n / 2)
    hits = sum(1 for signs in itertools.product((0, 1), repeat=n) if abs(sum(signs) - n / 2) >= observed)
    return hits / 2**n


@pytest.mark.parametrize("only_a,only_b", [(a, b) for a in range(8) for b in range(8) if a + b <= 12])
def test_mcnemar_exact_matches_enumeration(only_a, only_b):
    assert mcnemar_exact(only_a, only_b) == pytest.approx(_brute_force_p(only_a, only_b))


def test_mcnemar_exact_known_values_and_symmetry():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(13, 34) == mcnemar_exact(34, 13) < 0.01
    with pytest.raises(ValueError, match="must be >= 0"):
        mcnemar_exact(-1, 3)


def _records(correct: list[bool], regex: bool = False) -> list[dict]:
    return [
        {
            "id": f"q{i}",
            "dataset": "nq_gold" if i % 2 else "squad_open",
            "index": i,
            "answers": ["^paris$"] if regex else ["Paris"],
            "answers_are_regex": regex,
            "prediction": "paris" if ok else "lyon",
            "passages": [],
        }
        for i, ok in enumerate(correct)
    ]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_counts_discordant_questions(tmp_path):
    a = load_correct(_write(tmp_path / "a.jsonl", _records([True, True, False, False, True])))
    b = load_correct(_write(tmp_path / "b.jsonl", _records([True, False, True, False, False], regex=True)))
    c = compare(a, b)
    assert (c["n"], c["only_a"], c["only_b"]) == (5, 2, 1)
    assert c["em_a"] == pytest.approx(0.6) and c["em_b"] == pytest.approx(0.4)
    assert c["p"] == pytest.approx(_brute_force_p(2, 1))


def test_compare_refuses_different_questions_and_bad_files(tmp_path):
    a = load_correct(_write(tmp_path / "a.jsonl", _records([True, False, True])))
    b = load_correct(_write(tmp_path / "b.jsonl", _records([True, False])))
    with pytest.raises(ValueError, match="different questions"):
        compare(a, b)
    (tmp_path / "bad.jsonl").write_text('{"id": "q0"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not a prediction record"):
        load_correct(tmp_path / "bad.jsonl")


def _table6_rows() -> list[dict]:
    return [
        {"system": f"{h}_{r}", "label": f"{h}-{r}", "meta": {"head": h, "retriever": r}, "n_docs": 5}
        for r in ("bm25", "frozen", "learned")
        for h in ("token", "sequence")
    ]


def test_pairs_change_one_factor_at_a_time():
    rows = _table6_rows()
    pairs = choose_pairs(rows)
    # 3 head pairs (one per retriever) + 2 heads x 3 retriever pairs
    assert len(pairs) == 9
    for i, j, factor in pairs:
        differ = [k for k in rows[i]["meta"] if rows[i]["meta"][k] != rows[j]["meta"][k]]
        assert differ == [factor]
    assert {f for *_, f in choose_pairs(rows, ["retriever"])} == {"retriever"}
    assert len(choose_pairs(rows, ["retriever"])) == 6
    plain = [{k: v for k, v in r.items() if k != "meta"} for r in rows[:4]]
    assert [(i, j) for i, j, _ in choose_pairs(plain)] == list(itertools.combinations(range(4), 2))


def _sweep_run(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "figure3_train_k" / "run1"
    run.mkdir(parents=True)
    correct = {
        ("train5", 1): [True, False, False, True],
        ("train10", 1): [True, True, False, True],
        ("train5", 5): [True, True, False, False],
        ("train10", 5): [False, True, True, True],
    }
    rows = []
    for (system, k), ok in correct.items():
        _write(run / f"predictions-{system}-k{k}.jsonl", _records(ok))
        rows.append(
            {
                "system": system,
                "label": f"trained {system}",
                "meta": {"head": "token", "train_k": system},
                "n_docs": k,
                "em": sum(ok) / len(ok),
                "f1": sum(ok) / len(ok),
                "seconds": 1.0,
                "n": len(ok),
            }
        )
    result = {
        "study": "figure3_train_k",
        "kind": "sweep",
        "title": "train K",
        "split": "test",
        "limit": None,
        "command": "rag-replicate study=figure3_train_k",
        "commit": "0" * 40,
        "created": "2026-01-01T00:00:00+00:00",
        "hardware": {"cpu_count": 2, "cpu": "test"},
        "config": {"study": {"paired_by": ["train_k"]}},
        "rows": rows,
        "wall_seconds": 1.0,
    }
    (run / "result.json").write_text(json.dumps(result))
    return run


def test_sweep_pairs_rows_at_the_same_k(tmp_path):
    run = _sweep_run(tmp_path)
    pairs = paired_comparisons(json.loads((run / "result.json").read_text()), run)
    assert [(c["n_docs"], c["only_a"], c["only_b"]) for c in pairs] == [(1, 0, 1), (5, 1, 2)]
    assert all(c["factor"] == "train_k" and c["a"] == "trained train5" for c in pairs)


def test_aggregate_writes_the_paired_table_and_survives_missing_predictions(tmp_path, capsys):
    run = _sweep_run(tmp_path)
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("<!-- study:figure3_train_k -->\n<!-- /study:figure3_train_k -->\n")
    aggregate(tmp_path / "runs", tmp_path / "results", results_md)
    text = results_md.read_text()
    assert "| A | B | K=1 | K=5 |" in text
    assert "| trained train5 | trained train10 | -25.0 (0/1, p=1.000) | -25.0 (1/2, p=1.000) |" in text
    saved = json.loads((tmp_path / "results" / "figure3_train_k.json").read_text())
    assert len(saved["paired"]) == 2

    # predictions gone: the tables are still made, without the paired part, and the reason is printed
    (run / "predictions-train10-k5.jsonl").unlink()
    aggregate(tmp_path / "runs", tmp_path / "results2", results_md)
    err = capsys.readouterr().err
    assert "no paired comparisons" in err and "predictions-train10-k5.jsonl is missing" in err
    assert "| A | B |" not in results_md.read_text()
