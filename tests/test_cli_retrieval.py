"""rag-index and rag-eval-retrieval on a tiny corpus with a tiny BERT: configs, cache reuse, figures, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from transformers import AutoTokenizer, BertConfig, BertModel

from rag.cli import eval_retrieval as eval_cli
from rag.cli import index as index_cli
from rag.config_dir import conf_dir
from rag.errors import ConfigError
from rag.retrieval.bm25 import BM25Index
from rag.retrieval.embed import corpus_checksum, open_embeddings
from rag.retrieval.encoders import load_query_encoder
from rag.retrieval.index import read_manifest
from rag.types import Passage

TINY = Path(__file__).parent / "fixtures" / "tiny_bert"
TOPICS = [
    "paris france seine",
    "nile egypt africa",
    "berlin germany",
    "thames london england",
    "rome italy tiber",
]
PASSAGES = [Passage(f"p{i}", TOPICS[i % 5].split()[0], f"{TOPICS[i % 5]} city river {i}") for i in range(25)]
QUESTIONS = [
    {"id": f"q{i}", "question": q, "answers": [a], "gold_passage_ids": [g], "answers_are_regex": False}
    for i, (q, a, g) in enumerate(
        [
            ("what river is in paris france", "seine", "p0"),
            ("the nile of egypt", "africa", "p6"),
            ("capital of germany", "berlin", "p2"),
            ("london river", "thames", "p8"),
            ("rome italy", "tiber", "p14"),
            ("who was king of egypt", "nile", "p1"),
        ]
    )
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(TINY)).save_pretrained(root / "tiny")
    AutoTokenizer.from_pretrained(TINY).save_pretrained(root / "tiny")
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n" for p in PASSAGES)
    )
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return {
        "root": root,
        "model": root / "tiny",
        "corpus": root / "corpus.jsonl",
        "questions": root / "questions.jsonl",
    }


def tiny_overrides(setup, *extra, questions=True) -> list[str]:
    overrides = [
        "corpus=file",
        "corpus.name=tiny",
        f"corpus.passages.path={setup['corpus']}",
        "doc_encoder=bert",
        f"doc_encoder.model_name_or_path={setup['model']}",
        "doc_encoder.pooling=mean",
        "embed.show_progress=false",
        "threads=1",
    ]
    return overrides + list(extra)


def eval_overrides(setup, *extra) -> list[str]:
    return tiny_overrides(
        setup,
        "query_encoder=bert",
        f"query_encoder.model_name_or_path={setup['model']}",
        "query_encoder.pooling=mean",
        f"+corpus.question_sets.tiny={{_target_:rag.data.qa.read_questions,path:{setup['questions']}}}",
        "ks=[1,2,5,10]",
        "indexes.hnsw.recall_probes=0",
        *extra,
    )


def composed(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_rag_index_builds_into_the_cache_and_reuses_it(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    result = index_cli.run(composed("rag_index", tiny_overrides(setup)))
    assert result.built and result.index.kind == "flat" and result.index.ntotal == 25
    assert result.index_dir == tmp_path / "home" / "indexes" / "tiny-tiny-flat"
    assert result.embeddings_dir == tmp_path / "home" / "embeddings" / "tiny-tiny-float32"
    manifest = read_manifest(result.index_dir)
    assert manifest.corpus_checksum == corpus_checksum(PASSAGES) and manifest.n_passages == 25
    assert manifest.encoder_name == "tiny" and manifest.dim == 32
    assert "recall vs exact is 1.0" in capsys.readouterr().err

    again = index_cli.run(composed("rag_index", tiny_overrides(setup)))
    assert not again.built and "reusing the flat index" in capsys.readouterr().err
    rebuilt = index_cli.run(composed("rag_index", tiny_overrides(setup, "rebuild=true")))
    assert rebuilt.built
    # another kind goes to its own directory and reuses the embeddings (not recomputed: same mtime)
    stamp = next(result.embeddings_dir.glob("*.npy")).stat().st_mtime_ns
    hnsw = index_cli.run(composed("rag_index", tiny_overrides(setup, "index=hnsw", "index.m=8")))
    assert hnsw.built and hnsw.index_dir.name == "tiny-tiny-hnsw"
    assert next(result.embeddings_dir.glob("*.npy")).stat().st_mtime_ns == stamp
    assert "recall vs exact on" in capsys.readouterr().err
    # changed index parameters rebuild rather than reuse a mismatching index
    changed = index_cli.run(composed("rag_index", tiny_overrides(setup, "index=hnsw", "index.m=4")))
    assert changed.built and read_manifest(changed.index_dir).index_params["m"] == 4


def test_rag_index_shards_build_once_complete(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    first = index_cli.run(composed("rag_index", tiny_overrides(setup, "embed.shard=0", "embed.num_shards=2")))
    assert first.index is None and "shard 0 of 2 is embedded" in capsys.readouterr().err
    second = index_cli.run(
        composed("rag_index", tiny_overrides(setup, "embed.shard=1", "embed.num_shards=2"))
    )
    assert second.built and second.index.ntotal == 25


def test_eval_retrieval_figures_equal_brute_force(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    report = eval_cli.run(composed("eval_retrieval", eval_overrides(setup)), output_dir=tmp_path / "run")
    rows = {r["retriever"]: r for r in report["results"]}
    assert set(rows) == {"dense exact", "dense hnsw", "bm25"} and rows["bm25"]["n_questions"] == 6

    # dense exact by brute force: encode, score every passage, rank
    encoder = load_query_encoder(str(setup["model"]), pooling="mean").eval()
    with torch.no_grad():
        q = encoder.encode([x["question"] for x in QUESTIONS]).numpy()
    embeds = np.asarray(open_embeddings(tmp_path / "home" / "embeddings" / "tiny-tiny-float32"))
    ranking = np.argsort(-(q @ embeds.T), axis=1, kind="stable")
    bm25_ids = BM25Index().build(PASSAGES).search([x["question"] for x in QUESTIONS], 10)[1]
    for name, ids in (("dense exact", ranking), ("bm25", bm25_ids)):
        for k in (1, 2, 5, 10):
            gold = np.mean(
                [
                    f"p{QUESTIONS[b]['gold_passage_ids'][0][1:]}" in [f"p{i}" for i in ids[b, :k]]
                    for b in range(6)
                ]
            )
            answer = np.mean(
                [
                    any(QUESTIONS[b]["answers"][0] in PASSAGES[i].text.split() for i in ids[b, :k])
                    for b in range(6)
                ]
            )
            assert rows[name]["gold_recall"][str(k)] == pytest.approx(gold), (name, k)
            assert rows[name]["answer_recall"][str(k)] == pytest.approx(answer), (name, k)
    assert rows["bm25"]["gold_recall"]["10"] > rows["bm25"]["gold_recall"]["1"]

    saved = json.loads((tmp_path / "run" / "retrieval.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    table = (tmp_path / "run" / "retrieval.md").read_text()
    assert "| tiny | 6 | dense exact |" in table and "Gold-passage recall@k" in table
    assert "tiny/hnsw" in report["index_recall_vs_exact"]


def test_config_errors_are_clear(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("RAG_HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigCompositionException, match="indx"):
        composed("rag_index", ["indx=hnsw"])
    with pytest.raises(ConfigCompositionException, match="doc_encoder"):
        composed("rag_index", ["doc_encoder=no_such_encoder"])
    with pytest.raises(ConfigError, match="corpus.name, corpus.passages.path"):
        index_cli.run(composed("rag_index", ["corpus=file"]))
    with pytest.raises(ConfigError, match="no question sets"):
        eval_cli.run(composed("eval_retrieval", tiny_overrides(setup)))
    # a 384-d MiniLM query encoder with the 32-d tiny document encoder fails before any embedding
    mismatched = [o for o in eval_overrides(setup) if not o.startswith("query_encoder")]
    with pytest.raises(ConfigError, match="makes 384-d vectors, the document encoder 'tiny' 32-d"):
        eval_cli.run(composed("eval_retrieval", mismatched))
    assert not (tmp_path / "home" / "embeddings").exists()


@pytest.mark.parametrize("name", ["rag_index", "eval_retrieval"])
def test_shipped_configs_compose_for_every_encoder_and_index(name):
    for encoder in ("minilm", "dpr_nq"):
        for index in ("flat", "hnsw", "hnsw_sq8", "ivfpq"):
            group = "index" if name == "rag_index" else "index@indexes.exact"
            cfg = composed(name, [f"doc_encoder={encoder}", f"{group}={index}"])
            assert cfg.doc_encoder.model_name_or_path.split("/")[0] in ("sentence-transformers", "facebook")
    cfg = composed("eval_retrieval", [])
    assert list(cfg.corpus.question_sets) == [
        "squad_open-dev",
        "squad_open-test",
        "nq_gold-dev",
        "nq_gold-test",
    ]
    assert cfg.cache_dir.endswith(".cache/rag") or cfg.cache_dir == os.environ.get("RAG_HOME")


def test_console_entry_point_runs_and_fails_cleanly(setup, tmp_path):
    env = {**os.environ, "RAG_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "rag.cli.eval_retrieval",
            *eval_overrides(setup),
            "bm25.enabled=false",
            "~indexes.hnsw",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "| tiny | 6 | dense exact |" in ok.stdout
    assert json.loads((tmp_path / "run" / "retrieval.json").read_text())["n_passages"] == 25

    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "rag.cli.index",
            "corpus=file",
            "corpus.name=x",
            f"corpus.passages.path={tmp_path / 'missing.jsonl'}",
            f"hydra.run.dir={tmp_path / 'run2'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1 and "error: passage file not found" in bad.stderr
    assert "Traceback" not in bad.stderr
