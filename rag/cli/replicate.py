"""``rag-replicate``: one of the paper's experiments, as one command (see ``conf/study/``).

    rag-replicate study=table1                # closed-book BART vs RAG-Token vs RAG-Sequence (Table 1)
    rag-replicate study=table6                # BM25 vs frozen vs learned retriever, both heads (Table 6)
    rag-replicate study=figure3               # K = 1..50 at test time, EM and answer recall@K (Figure 3)
    rag-replicate study=figure3_train_k       # trained with K=5 vs K=10, swept over test-time K
    rag-replicate study=hotswap               # the index swapped without retraining (section 4.5)
    rag-replicate study=decoding              # RAG-Sequence thorough vs fast, RAG-Token greedy vs beam
    rag-replicate study=figure3 limit=50 split=val      # any study on fewer questions / another split

Each run writes ``result.json`` (rows, command, commit, config, hardware), ``result.md`` and the
predictions of every system to ``outputs/replicate/<study>/<time>/``; ``rag-aggregate`` turns the latest run
of each study into the tables and plots of ``results/`` and ``RESULTS.md``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from rag.build import check_required, set_threads
from rag.cli.app import hydra_entry

CONFIG_NAME = "replicate"


def run(cfg: DictConfig) -> dict:
    from rag.replication.aggregate import study_markdown
    from rag.replication.provenance import command_line
    from rag.replication.studies import run_study

    check_required(cfg)
    set_threads(cfg.threads)
    result = run_study(cfg, command_line("rag-replicate"))
    print("\n" + study_markdown(result))
    return result


def main() -> None:
    hydra_entry(run, CONFIG_NAME, "rag-replicate")


if __name__ == "__main__":
    main()
