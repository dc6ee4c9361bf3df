"""Answer a split's questions with a model and score them; the building block of every study.

A *system* is a model and a decoder. Its model comes either from a ``rag-train`` experiment's starting
weights (the shipped reference, as ``rag-reference`` evaluates it) or from a trained run's checkpoint.
Retrieval can be done once and reused: :func:`retrieve_all` searches at the largest K, and
:func:`answer_all` then reads the first K of those passages for any smaller K (the Figure 3 sweep) or the
passages of a swapped index.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from rag.evaluation import Prediction, score_records
from rag.types import Question, RetrievalOutput


@dataclass
class Split:
    """The questions of one split: ``rows`` are (set name, index in the set, question)."""

    rows: list[tuple[str, int, Question]]

    @property
    def questions(self) -> list[Question]:
        return [q for _, _, q in self.rows]

    @property
    def datasets(self) -> list[str]:
        return [d for d, _, _ in self.rows]

    @property
    def indices(self) -> list[int]:
        return [i for _, i, _ in self.rows]

    @property
    def sets(self) -> list[str]:
        return list(dict.fromkeys(self.datasets))

    def only(self, dataset: str) -> Split:
        return Split([r for r in self.rows if r[0] == dataset])


@dataclass
class Answered:
    """One system's prediction records on a split, with the time its answering took."""

    records: list[Prediction]
    seconds: float
    metrics: dict = field(default_factory=dict)


def load_split(train_cfg: DictConfig, split: str, limit: int | None = None) -> Split:
    """The questions of ``split`` under a training config's data settings (first ``limit`` of each set)."""
    from rag.build import instantiate

    datamodule = instantiate(train_cfg.data, **{f"limit_{split}": limit})
    return Split(list(datamodule.sets[split].rows))


def retrieve_all(model, split: Split, n_docs: int, batch_size: int, desc: str = "retrieving") -> list:
    """One search per batch of ``batch_size`` questions at K = ``n_docs`` (None for a closed-book model)."""
    from tqdm.auto import tqdm

    if model.closed_book:
        return [None] * ((len(split.rows) + batch_size - 1) // batch_size)
    out = []
    questions = split.questions
    with torch.no_grad(), tqdm(total=len(questions), desc=desc, unit="q", file=sys.stderr) as bar:
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            out.append(model.retrieve(batch, n_docs))
            bar.update(len(batch))
    return out


def answer_all(
    model,
    split: Split,
    *,
    decoder: str,
    n_docs: int | None,
    batch_size: int,
    desc: str,
    retrievals: Sequence[RetrievalOutput | None] | None = None,
    recall_ks: Sequence[int] = (1,),
) -> Answered:
    """Prediction records for every question of ``split``, in batches, with a progress bar, and their scores.

    ``retrievals``: from :func:`retrieve_all` with the same ``batch_size`` and a K >= ``n_docs``; None: each
    batch is retrieved here.
    """
    from tqdm.auto import tqdm

    questions = split.questions
    n_batches = (len(questions) + batch_size - 1) // batch_size
    if retrievals is not None and len(retrievals) != n_batches:
        raise ValueError(
            f"retrievals holds {len(retrievals)} batches but the split makes {n_batches} batches of "
            f"{batch_size}: retrieve with the same batch_size"
        )
    records: list[Prediction] = []
    started = time.perf_counter()
    with tqdm(total=len(questions), desc=desc, unit="q", file=sys.stderr) as bar:
        for b, start in enumerate(range(0, len(questions), batch_size)):
            chunk = slice(start, start + batch_size)
            retrieval = None if retrievals is None else retrievals[b]
            answers = model.generate(questions[chunk], decoder=decoder, n_docs=n_docs, retrieval=retrieval)
            records.extend(
                Prediction.from_answer(q, a, d, i)
                for q, a, d, i in zip(questions[chunk], answers, split.datasets[chunk], split.indices[chunk])
            )
            bar.update(len(answers))
    seconds = time.perf_counter() - started
    ks = sorted({*recall_ks, n_docs} if n_docs else {1})
    return Answered(records, seconds, score_records(records, ks))


def row_metrics(metrics: dict, n_docs: int | None, sets: Sequence[str]) -> dict:
    """The flat numbers a results row keeps: EM, F1, answer / gold-passage recall@K overall and per set."""
    keep = {"em": metrics.get("em"), "f1": metrics.get("f1"), "n": metrics.get("n")}
    if n_docs:
        keep["answer_recall"] = metrics.get(f"answer_recall@{n_docs}")
        keep["gold_recall"] = metrics.get(f"gold_recall@{n_docs}")
    for s in sets:
        prefix = f"{s}/" if len(sets) > 1 else ""
        keep[f"{s}/em"] = metrics.get(f"{prefix}em")
        keep[f"{s}/f1"] = metrics.get(f"{prefix}f1")
        keep[f"{s}/n"] = metrics.get(f"{prefix}n")
        if n_docs:
            keep[f"{s}/answer_recall"] = metrics.get(f"{prefix}answer_recall@{n_docs}")
    return keep


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (``ru_maxrss`` is in kilobytes on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
