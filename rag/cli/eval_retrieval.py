"""``rag-eval-retrieval``: answer recall@k and gold-passage recall@k of dense (exact, HNSW) and BM25 retrieval.

    rag-eval-retrieval                          # the mini-wiki dev and test questions, MiniLM, k in 1..50
    rag-eval-retrieval query_encoder=dpr_nq doc_encoder=dpr_nq   # DPR where a hub is reachable
    rag-eval-retrieval index@indexes.hnsw=hnsw_sq8 bm25.enabled=false

Builds the indexes it needs if they are missing (reusing the embeddings, see ``rag-index``), then prints two
markdown tables and writes them with every figure to ``retrieval.md`` and ``retrieval.json`` in the Hydra
run directory. The figures (answer recall@k: a gold answer string among the top-k passages' texts, DPR's
top-k accuracy; gold-passage recall@k: the question's own passage among the top k) are
:mod:`rag.retrieval.evaluation`'s.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rag.atomic import write_text_atomic
from rag.build import (
    cache_dir,
    check_required,
    default_embeddings_dir,
    default_index_dir,
    instantiate,
    set_threads,
)
from rag.cli.app import hydra_entry
from rag.errors import ConfigError
from rag.retrieval.evaluation import (
    evaluate_retrievers,
    indexed_retriever,
    json_default,
    json_rows,
    markdown_tables,
)
from rag.retrieval.retriever import BM25Retriever, Retriever

log = logging.getLogger("rag.cli.eval_retrieval")


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
            retrievers[f"dense {name}"] = indexed_retriever(
                passages,
                doc_encoder,
                query_encoder,
                index,
                default_index_dir(cfg.cache_dir, cfg.corpus.name, doc_encoder, index.kind),
                embeddings_dir,
                embed=embed,
                rebuild=cfg.rebuild,
                rebuild_command=f"rag-eval-retrieval rebuild=true (or rag-index index={index.kind} rebuild=true)",
                corpus_name=cfg.corpus.name,
            )
            dense_indexes[name] = retrievers[f"dense {name}"].index
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

    rows, index_recall = evaluate_retrievers(
        retrievers, question_sets, ks, query_encoder, dense_indexes, query_batch_size=cfg.query_batch_size
    )
    table = markdown_tables(rows, ks)
    wall = time.perf_counter() - started
    report = {
        "corpus": cfg.corpus.name,
        "n_passages": len(passages),
        "query_encoder": query_encoder.name,
        "ks": ks,
        "results": json_rows(rows),
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
        write_text_atomic(out / "retrieval.json", json.dumps(report, indent=1, default=json_default))
        log.info(f"wrote {out / 'retrieval.md'} and {out / 'retrieval.json'}")
    return report


def _run_in_hydra(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig

    return run(cfg, output_dir=HydraConfig.get().runtime.output_dir)


def main() -> None:
    hydra_entry(_run_in_hydra, "eval_retrieval", "rag-eval-retrieval")


if __name__ == "__main__":
    main()
