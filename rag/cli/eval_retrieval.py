"""``rag-eval-retrieval``: answer recall@k and gold-passage recall@k of dense (exact, HNSW) and BM25 retrieval.

    rag-eval-retrieval                          # the mini-wiki dev and test questions, MiniLM, k in 1..50
    rag-eval-retrieval query_encoder=dpr_nq doc_encoder=dpr_nq   # DPR where a hub is reachable

Builds the indexes it needs if they are missing (reusing the embeddings, see ``rag-index``), then prints two
markdown tables and writes them with every figure to ``retrieval.md`` and ``retrieval.json`` in the Hydra
run directory.

- answer recall@k (DPR's top-k retrieval accuracy): the fraction of questions with a gold answer string
  among the texts of their top-k passages (``rag.metrics.has_answer``);
- gold-passage recall@k: the fraction with the passage the question was written on among the top k
  (questions without gold passages are skipped and counted).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rag.atomic import write_text_atomic
from rag.build import (
    cache_dir,
    check_required,
    default_embeddings_dir,
    default_index_dir,
    ensure_index,
    instantiate,
    set_threads,
)
from rag.cli.app import hydra_entry
from rag.errors import ConfigError
from rag.metrics import answer_recall_at_k, gold_recall_at_k, gold_recall_counts
from rag.retrieval.embed import EmbeddingsError, open_embeddings
from rag.retrieval.index import recall_vs_exact
from rag.retrieval.retriever import BM25Retriever, DenseRetriever, Retriever
from rag.types import Question

log = logging.getLogger("rag.cli.eval_retrieval")


def evaluate(
    retriever: Retriever,
    questions: list[Question],
    ks: list[int],
    question_embeds: torch.Tensor | None = None,
) -> dict:
    """Recall figures of one retriever on one question set (top max(ks) passages per question)."""
    n_docs = min(max(ks), retriever.n_passages)
    texts = [q.question for q in questions]
    start = time.perf_counter()
    if question_embeds is not None:
        out = retriever.retrieve_by_embeds(question_embeds, n_docs)
    else:
        out = retriever.retrieve(texts, n_docs)
    seconds = time.perf_counter() - start
    regex = {q.answers_are_regex for q in questions}
    if len(regex) > 1:
        raise ConfigError("a question set mixes regex and string answers: split it into two sets")
    retrieved_texts = [[p.text for p in row] for row in out.passages]
    retrieved_ids = [[p.id for p in row] for row in out.passages]
    gold_ids = [q.gold_passage_ids for q in questions]
    scored, skipped = gold_recall_counts(gold_ids)
    return {
        "n_questions": len(questions),
        "answer_recall": answer_recall_at_k(
            retrieved_texts, [q.answers for q in questions], ks, regex=regex.pop()
        ),
        "gold_recall": gold_recall_at_k(retrieved_ids, gold_ids, ks) if scored else None,
        "gold_scored": scored,
        "gold_skipped": skipped,
        "search_seconds": seconds,
    }


def markdown_tables(rows: list[dict], ks: list[int]) -> str:
    """Two markdown tables (answer recall@k, gold-passage recall@k), percentages with one decimal."""
    header = "| questions | n | retriever | " + " | ".join(f"@{k}" for k in ks) + " |"
    rule = "|---|---:|---|" + "---:|" * len(ks)
    parts = []
    for key, title in (
        ("answer_recall", "Answer recall@k (% of questions with a gold answer in the top-k passages)"),
        ("gold_recall", "Gold-passage recall@k (% of questions with their gold passage in the top k)"),
    ):
        lines = [f"**{title}**", "", header, rule]
        for row in rows:
            values = row[key]
            cells = [f"{100 * values[k]:.1f}" if values else "-" for k in ks]
            lines.append(
                f"| {row['questions']} | {row['n_questions']} | {row['retriever']} | "
                + " | ".join(cells)
                + " |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def run(cfg: DictConfig, output_dir: str | os.PathLike | None = None) -> dict:
    check_required(cfg)
    set_threads(cfg.threads)
    ks = sorted({int(k) for k in cfg.ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks must be positive integers, got {list(cfg.ks)}")
    started = time.perf_counter()

    passages = instantiate(cfg.corpus.passages)
    question_sets = {name: instantiate(node) for name, node in cfg.corpus.question_sets.items()}
    if not question_sets:
        raise ConfigError(
            f"corpus {cfg.corpus.name!r} has no question sets to evaluate: add one, e.g. "
            "+corpus.question_sets.dev={_target_:rag.data.qa.read_questions,path:dev.jsonl}"
        )
    for name, questions in question_sets.items():
        log.info(f"questions {name}: {len(questions):,}")
    query_encoder = instantiate(cfg.query_encoder).to(cfg.device).eval()
    embed = OmegaConf.to_container(cfg.embed, resolve=True)

    retrievers: dict[str, Retriever] = {}
    dense_indexes = {}
    if cfg.indexes:
        doc_encoder = instantiate(cfg.doc_encoder).to(cfg.device)
        if doc_encoder.dim != query_encoder.dim:
            raise ConfigError(
                f"the query encoder {query_encoder.name!r} makes {query_encoder.dim}-d vectors, the document "
                f"encoder {doc_encoder.name!r} {doc_encoder.dim}-d ones: pick a matching pair "
                "(query_encoder=X doc_encoder=X)"
            )
        embeddings_dir = cfg.embeddings_dir or default_embeddings_dir(
            cfg.cache_dir, cfg.corpus.name, doc_encoder, embed["dtype"]
        )
        for name, node in cfg.indexes.items():
            index = instantiate(node)
            result = ensure_index(
                passages,
                doc_encoder,
                index,
                default_index_dir(cfg.cache_dir, cfg.corpus.name, doc_encoder, index.kind),
                embeddings_dir,
                embed=embed,
                rebuild=cfg.rebuild,
                rebuild_command=f"rag-eval-retrieval rebuild=true (or rag-index index={index.kind} rebuild=true)",
                corpus_name=cfg.corpus.name,
            )
            try:
                doc_embeds = open_embeddings(result.embeddings_dir, expected_rows=len(passages))
            except EmbeddingsError as err:
                # the index alone still serves: its own vectors (exact for flat and hnsw) stand in
                log.info(
                    f"stored embeddings unusable ({err}); using the vectors held by the {index.kind} index"
                )
                doc_embeds = None
            retrievers[f"dense {name}"] = DenseRetriever(
                result.index, passages, query_encoder, doc_embeds=doc_embeds
            )
            dense_indexes[name] = result.index
        del doc_encoder
    if cfg.bm25.enabled:
        start = time.perf_counter()
        retrievers["bm25"] = BM25Retriever.from_passages(
            passages,
            k1=cfg.bm25.k1,
            b=cfg.bm25.b,
            stopwords=cfg.bm25.stopwords,
            index_dir=cache_dir(cfg.cache_dir) / "indexes" / f"{cfg.corpus.name}-bm25",
        )
        log.info(f"BM25 index ready in {time.perf_counter() - start:.1f} s")
    if not retrievers:
        raise ConfigError(
            "nothing to evaluate: give at least one index in `indexes` or set bm25.enabled=true"
        )

    rows, index_recall = [], {}
    with torch.inference_mode():
        for set_name, questions in question_sets.items():
            question_embeds = None
            if dense_indexes:
                start = time.perf_counter()
                question_embeds = query_encoder.encode(
                    [q.question for q in questions], batch_size=cfg.query_batch_size
                )
                encode_seconds = time.perf_counter() - start
            for name, retriever in retrievers.items():
                dense = isinstance(retriever, DenseRetriever)
                row = evaluate(retriever, questions, ks, question_embeds if dense else None)
                if dense:
                    row["encode_seconds"] = encode_seconds
                rows.append({"questions": set_name, "retriever": name, **row})
                log.info(
                    f"{set_name} / {name}: answer recall@{ks[-1]} {row['answer_recall'][ks[-1]]:.3f} "
                    f"({len(questions) / max(row['search_seconds'], 1e-9):.0f} questions/s search)"
                )
            approximate = {n: i for n, i in dense_indexes.items() if not i.is_exact}
            exact = next((i for i in dense_indexes.values() if i.is_exact), None)
            if exact is not None and approximate:
                queries = question_embeds.float().cpu().numpy()
                for name, index in approximate.items():
                    rec = recall_vs_exact(index, exact, queries, k=ks)
                    index_recall[f"{set_name}/{name}"] = rec
                    shown = " ".join(f"@{k.split('@')[1]} {v:.3f}" for k, v in rec.items() if "@" in k)
                    log.info(f"{name} recall vs exact search on the {set_name} questions: {shown}")

    table = markdown_tables(rows, ks)
    wall = time.perf_counter() - started
    report = {
        "corpus": cfg.corpus.name,
        "n_passages": len(passages),
        "query_encoder": query_encoder.name,
        "ks": ks,
        "results": [
            {**r, "answer_recall": _keys(r["answer_recall"]), "gold_recall": _keys(r["gold_recall"])}
            for r in rows
        ],
        "index_recall_vs_exact": index_recall,
        "wall_seconds": wall,
        "threads": torch.get_num_threads(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    print(table)
    log.info(f"done in {wall:.0f} s on {torch.get_num_threads()} threads")
    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "retrieval.md", table)
        write_text_atomic(out / "retrieval.json", json.dumps(report, indent=1, default=_json_default))
        log.info(f"wrote {out / 'retrieval.md'} and {out / 'retrieval.json'}")
    return report


def _keys(values: dict | None) -> dict | None:
    return None if values is None else {str(k): v for k, v in values.items()}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _run_in_hydra(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    return run(cfg, output_dir=HydraConfig.get().runtime.output_dir)


def main() -> None:
    hydra_entry(_run_in_hydra, "eval_retrieval", "rag-eval-retrieval")


if __name__ == "__main__":
    main()
