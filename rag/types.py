"""Shared records and the dimension legend.

Dimension legend used in shape comments and annotations across the package:

    B  batch (questions)          K  docs per question (``n_docs``)
    Lq question tokens            Lc context tokens (passage + question)
    T  target tokens              V  vocabulary
    H  encoder hidden size        D  index dimension
    N  corpus size
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Passage:
    """One retrievable unit of text: at most ~100 words of a Wikipedia article (paper §2.2 / DPR)."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    """An open-domain question with its gold answers.

    ``answers`` are plain strings, except for CuratedTrec where ``answers_are_regex`` is set and each
    answer is a regular expression. ``gold_passage_ids`` name passages of the corpus the question was
    built for (empty when the dataset has none).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    gold_passage_ids: tuple[str, ...] = ()
    answers_are_regex: bool = False


@dataclass
class RetrievalOutput:
    """What every retriever returns for a batch of B questions and K = ``n_docs`` documents each.

    ``doc_ids`` index rows of the corpus (0..N-1); ``doc_scores`` are the retrieval logits (inner products
    for dense retrieval, BM25 scores for BM25); ``retrieved_doc_embeds`` lets the caller recompute
    ``doc_scores`` with gradient from the query embeddings (None for BM25).
    """

    doc_ids: torch.Tensor  # (B, K) int64
    doc_scores: torch.Tensor  # (B, K) float32
    passages: list[list[Passage]]  # B lists of K passages
    retrieved_doc_embeds: torch.Tensor | None = None  # (B, K, D)
    question_embeds: torch.Tensor | None = None  # (B, D)
    extras: dict = field(default_factory=dict)

    @property
    def n_docs(self) -> int:
        return int(self.doc_ids.shape[1])

    def top(self, k: int) -> RetrievalOutput:
        """The first (best) ``k`` documents of each question: what a search for K = ``k`` returns, so one
        search at the largest K serves every smaller K (the Figure 3 sweep)."""
        if not 1 <= k <= self.n_docs:
            raise ValueError(f"k must be between 1 and the {self.n_docs} documents retrieved, got {k}")
        return RetrievalOutput(
            doc_ids=self.doc_ids[:, :k],
            doc_scores=self.doc_scores[:, :k],
            passages=[row[:k] for row in self.passages],
            retrieved_doc_embeds=None
            if self.retrieved_doc_embeds is None
            else self.retrieved_doc_embeds[:, :k],
            question_embeds=self.question_embeds,
            extras=dict(self.extras),
        )
