"""The paper's own numbers for the tables the studies reproduce (Lewis et al. 2020, arXiv:2005.11401v4).

Only what the paper prints; a row of ours with no counterpart there (e.g. the closed-book BART of the
mini-wiki Table 1) shows "-". Natural Questions (NQ-open) exact match is the column we set beside ours: the
mini-wiki's ``nq_gold`` questions are NQ-open questions.
"""

from __future__ import annotations

PAPER = {
    "table1": {
        "column": "paper NQ test EM",
        "source": "Lewis et al. 2020, Table 1 (open-domain QA test scores), NQ column",
        "values": {"RAG-Token": 44.1, "RAG-Sequence": 44.5},
    },
    "table6": {
        "column": "paper NQ dev EM",
        "source": "Lewis et al. 2020, Table 6 (ablations on the dev set), NQ column",
        "values": {
            "RAG-Token-BM25": 29.7,
            "RAG-Sequence-BM25": 31.8,
            "RAG-Token-Frozen": 37.8,
            "RAG-Sequence-Frozen": 41.2,
            "RAG-Token": 43.5,
            "RAG-Sequence": 44.0,
        },
    },
}


def paper_numbers(study: str) -> dict | None:
    """``{"column", "source", "values": {row label: number}}`` for a study, or None."""
    return PAPER.get(study)
