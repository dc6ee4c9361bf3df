"""The replication harness (rag.replication, rag-replicate, rag-aggregate) on tiny random models.

The numbers of tiny random models mean nothing; what is checked is what must hold whatever the weights:
one search reused for smaller K reads exactly what a search for K reads, recall over one ranked list grows
with K, a swapped index changes what is read (no gold passage without them, only the other dataset's
passages), an extended index finds the passages added, and the aggregator's tables, CSV, plots and
RESULTS.md come from the runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rag.reference import write_manifest
from rag.retrieval.index import FlatIndex
from rag.retrieval.retriever import DenseRetriever
from rag.types import Passage


def _overrides(tmp_path: Path, *extra: str) -> str:
    items = (f"runs_dir={tmp_path / 'runs'}", "threads=1", *extra)
    return "[" + ",".join(f"'{o}'" for o in items) + "]"


def _replicate(tmp_path: Path, study: str, out: str, *args: str) -> dict:
    """``rag-replicate study=<study> ...`` through its console-script entry point; returns result.json."""
    from rag.cli import replicate as cli

    ref = tmp_path / "ref"
    if not ref.is_dir():
        ref.mkdir()
        write_manifest(ref, {"commit": "0" * 40, "command": "python scripts/train_reference.py"})
    argv = [
        "rag-replicate",
        f"study={study}",
        f"reference_dir={ref}",
        f"cache_dir={tmp_path / 'cache'}",
        f"train_root={tmp_path / 'train'}",
        "threads=1",
        f"hydra.run.dir={tmp_path / out}",
        *args,
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        cli.main()
    return json.loads((tmp_path / out / "result.json").read_text())


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------- retrieval pieces


def _toy_retriever(n: int = 40, dim: int = 8, seed: int = 0) -> tuple[DenseRetriever, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # unit rows: each is its own best match
    passages = [Passage(id=f"{'ab'[i % 2]}:{i}", title=f"t{i}", text=f"passage {i}") for i in range(n)]
    index = FlatIndex(verbose=False).build(vectors)
    return DenseRetriever(index, passages, doc_embeds=vectors), vectors


def test_subset_searches_exactly_the_kept_passages():
    retriever, vectors = _toy_retriever()
    keep = [i for i in range(40) if i % 3]
    sub = retriever.subset(keep)
    queries = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32))
    got = sub.retrieve_by_embeds(queries, 4)
    # brute force over the kept rows
    scores = queries.numpy() @ vectors[keep].T  # (5, M)
    best = np.argsort(-scores, axis=1)[:, :4]
    want_ids = [[f"{'ab'[keep[j] % 2]}:{keep[j]}" for j in row] for row in best]
    assert [[p.id for p in row] for row in got.passages] == want_ids
    assert torch.allclose(got.doc_scores, torch.from_numpy(np.take_along_axis(scores, best, 1)), atol=1e-5)
    assert retriever.n_passages == 40 and sub.n_passages == len(keep)  # the original is untouched


def test_extended_finds_the_added_passages_and_leaves_the_original_alone():
    retriever, vectors = _toy_retriever()
    removed = [3, 17, 28]
    reduced = retriever.subset([i for i in range(40) if i not in removed])
    queries = torch.from_numpy(vectors[removed] * 10)  # each query points at one removed passage
    assert not {p.id for row in reduced.retrieve_by_embeds(queries, 1).passages for p in row} & {
        retriever.passages[i].id for i in removed
    }
    extended = reduced.extended([retriever.passages[i] for i in removed], vectors[removed])
    top = extended.retrieve_by_embeds(queries, 1)
    assert [row[0].id for row in top.passages] == [retriever.passages[i].id for i in removed]
    assert extended.n_passages == 40 and reduced.n_passages == 37
    with pytest.raises(ValueError, match=r"embeds must be \(3, 8\)"):
        reduced.extended([retriever.passages[i] for i in removed], vectors[:2])


def test_retrieval_top_k_is_the_prefix_and_checks_k():
    retriever, _ = _toy_retriever()
    queries = torch.randn(3, 8)
    big = retriever.retrieve_by_embeds(queries, 10)
    small = retriever.retrieve_by_embeds(queries, 4)
    top = big.top(4)
    assert torch.equal(top.doc_ids, small.doc_ids)
    assert torch.allclose(top.doc_scores, small.doc_scores)
    assert [[p.id for p in r] for r in top.passages] == [[p.id for p in r] for r in small.passages]
    with pytest.raises(ValueError, match="between 1 and the 10"):
        big.top(11)


# ---------------------------------------------------------------------------------------- studies


def test_table1_study_then_aggregate_into_tables_plots_and_results_md(tmp_path, capsys):
    smoke = _overrides(tmp_path)
    result = _replicate(
        tmp_path,
        "table1",
        "t1",
        "limit=2",
        "study.n_docs=3",
        "study.systems.closed_book.experiment=smoke",
        "study.systems.rag_token.experiment=smoke",
        "study.systems.rag_sequence.experiment=smoke",
        f"+study.systems.closed_book.overrides={_overrides(tmp_path, 'model.retriever_mode=none')}",
        f"+study.systems.rag_token.overrides={smoke}",
        f"+study.systems.rag_sequence.overrides={smoke}",
    )
    printed = capsys.readouterr().out
    assert [r["label"] for r in result["rows"]] == ["Closed-book BART", "RAG-Token", "RAG-Sequence"]
    closed, token, sequence = result["rows"]
    assert closed["n_docs"] is None and token["n_docs"] == 3 and sequence["decoder"] == "sequence_thorough"
    assert token["n"] == 4 and token["squad_open/n"] == 2 and token["nq_gold/n"] == 2
    # the two RAG rows share one model and one search; the closed-book row reads nothing
    assert token["search_seconds"] > 0 and sequence["search_seconds"] == token["search_seconds"]
    assert all(len(p["passages"]) == 3 for p in _predictions(tmp_path / "t1" / "predictions-rag_token.jsonl"))
    assert all(not p["passages"] for p in _predictions(tmp_path / "t1" / "predictions-closed_book.jsonl"))
    assert result["command"].startswith("rag-replicate study=table1") and result["commit"]
    assert result["config"]["study"]["name"] == "table1" and "| RAG-Token |" in printed

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("intro\n<!-- study:table1 -->\nold table\n<!-- /study:table1 -->\noutro\n")
    from rag.cli.aggregate import main as aggregate_main

    aggregate_main(
        [
            "--runs",
            str(tmp_path / "none"),
            "--result",
            str(tmp_path / "t1" / "result.json"),
            "--out",
            str(tmp_path / "results"),
            "--results-md",
            str(results_md),
        ]
    )
    text = results_md.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    assert "| RAG-Sequence | sequence_thorough | 3 |" in text and "44.5" in text  # the paper's NQ column
    assert "rag-replicate study=table1" in text and "![table1](results/table1.png)" in text
    csv_lines = (tmp_path / "results" / "table1.csv").read_text().splitlines()
    assert csv_lines[0].startswith("system,decoder,K,EM,F1") and len(csv_lines) == 4
    assert (tmp_path / "results" / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    aggregated = json.loads((tmp_path / "results" / "table1.json").read_text())
    assert aggregated["rows"] == result["rows"]
    # every pair of the three systems compared on the same 4 questions; EMs agree with the study's scoring
    em = {r["label"]: r["em"] for r in result["rows"]}
    assert [(c["a"], c["b"]) for c in aggregated["paired"]] == [
        ("Closed-book BART", "RAG-Token"),
        ("Closed-book BART", "RAG-Sequence"),
        ("RAG-Token", "RAG-Sequence"),
    ]
    for c in aggregated["paired"]:
        assert (
            c["n"] == 4 and c["em_a"] == pytest.approx(em[c["a"]]) and c["em_b"] == pytest.approx(em[c["b"]])
        )
        assert c["em_a"] - c["em_b"] == pytest.approx((c["only_a"] - c["only_b"]) / 4)
    assert "| A | B | EM A | EM B |" in text


def test_figure3_sweep_reuses_one_search_and_recall_grows_with_k(tmp_path):
    smoke = _overrides(tmp_path)
    result = _replicate(
        tmp_path,
        "figure3",
        "f3",
        "limit=3",
        "study.ks=[1,2,4]",
        "study.systems.rag_token.experiment=smoke",
        "study.systems.rag_sequence.experiment=smoke",
        "study.systems.rag_sequence.decoder=sequence_fast",
        f"+study.systems.rag_token.overrides={smoke}",
        f"+study.systems.rag_sequence.overrides={smoke}",
    )
    rows = result["rows"]
    assert [(r["system"], r["n_docs"]) for r in rows] == [
        (s, k) for s in ("rag_token", "rag_sequence") for k in (1, 2, 4)
    ]
    token = [r for r in rows if r["system"] == "rag_token"]
    recalls = [r["answer_recall"] for r in token]
    assert recalls == sorted(recalls)  # the first k of one ranked list: recall@k cannot fall as k grows
    # what was read at K=2 from the K=4 search is what a fresh search for K=2 returns
    from rag.build import build_model, compose_train_config
    from rag.replication.evaluate import load_split

    cfg = compose_train_config(
        "smoke", [f"runs_dir={tmp_path / 'runs'}", f"cache_dir='{tmp_path / 'cache'}'"]
    )
    model = build_model(cfg).eval()
    split = load_split(cfg, "test", 3)
    fresh = model.generate(split.questions[:4], n_docs=2, decoder="token_greedy")
    swept = _predictions(tmp_path / "f3" / "predictions-rag_token-k2.jsonl")[:4]
    assert [[p.id for p in a.passages] for a in fresh] == [[p["id"] for p in r["passages"]] for r in swept]
    assert [a.answer for a in fresh] == [r["prediction"] for r in swept]


def test_hotswap_reads_what_each_index_holds(tmp_path):
    # the whole mini-wiki, so that the test questions' gold passages are in the full index
    corpus = _overrides(tmp_path, "corpus.passages.limit=6536", "corpus.name=miniwiki-all")
    result = _replicate(
        tmp_path,
        "hotswap",
        "hs",
        "limit=2",
        "study.n_docs=3",
        "study.systems.rag_token.experiment=smoke",
        f"+study.systems.rag_token.overrides={corpus}",
    )
    rows = {r["index"]: r for r in result["rows"]}
    assert list(rows) == ["full", "minus_test_gold", "other_dataset", "extended"]
    full = _predictions(tmp_path / "hs" / "predictions-rag_token-full.jsonl")
    gold = {g for r in full for g in r["gold_passage_ids"]}
    n_gold = len(gold)
    assert rows["full"]["index_passages"] == {"all": 6536}
    assert rows["minus_test_gold"]["index_passages"] == {"all": 6536 - n_gold}
    assert rows["extended"]["index_passages"] == {"all": 6536}
    minus = _predictions(tmp_path / "hs" / "predictions-rag_token-minus_test_gold.jsonl")
    assert not {p["id"] for r in minus for p in r["passages"]} & gold
    assert rows["minus_test_gold"]["gold_recall"] == 0.0
    other = _predictions(tmp_path / "hs" / "predictions-rag_token-other_dataset.jsonl")
    own = {"squad_open": "squad:", "nq_gold": "nq:"}
    for r in other:
        other_prefix = own["nq_gold" if r["dataset"] == "squad_open" else "squad_open"]
        assert all(p["id"].startswith(other_prefix) for p in r["passages"])
    # re-encoded gold passages score as their stored vectors do (up to float16 storage)
    extended = _predictions(tmp_path / "hs" / "predictions-rag_token-extended.jsonl")
    for a, b in zip(full, extended):
        assert [p["id"] for p in a["passages"]][:1] == [p["id"] for p in b["passages"]][:1]


def test_a_trained_system_trains_once_then_is_reused(tmp_path):
    smoke = _overrides(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2")
    args = [
        "limit=1",
        "study.n_docs=2",
        "~study.systems.closed_book",
        "~study.systems.rag_sequence",
        "study.systems.rag_token.experiment=smoke",
        "+study.systems.rag_token.train=true",
        "+study.systems.rag_token.run=tuned",
        f"+study.systems.rag_token.overrides={smoke}",
    ]
    first = _replicate(tmp_path, "table1", "a", *args)
    folder = tmp_path / "train" / "table1" / "tuned"
    ckpt = folder / "checkpoints" / "last.ckpt"
    assert json.loads((folder / "metrics.json").read_text())["global_step"] == 2
    stamp = ckpt.stat().st_mtime_ns
    second = _replicate(tmp_path, "table1", "b", *args)
    assert ckpt.stat().st_mtime_ns == stamp  # finished: not trained again
    assert (
        first["rows"][0]["trained"] and first["models"] and second["rows"][0]["em"] == first["rows"][0]["em"]
    )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("study.systems.rag_token.colour", "red", "unknown keys \\['colour'\\]"),
        ("study.systems.rag_token.train", True, "names no run"),
        ("study.indexes", ["full", "yesterday"], "unknown \\['yesterday'\\]"),
        ("study.kind", "survey", "study.kind must be one of"),
    ],
)
def test_study_config_mistakes_fail_before_any_model_loads(key, value, message):
    from omegaconf import OmegaConf

    from rag.errors import ConfigError
    from rag.replication.studies import check_study

    cfg = OmegaConf.create({"study": OmegaConf.load(Path(__file__).parents[1] / "conf/study/hotswap.yaml")})
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError, match=message):
        check_study(cfg)
