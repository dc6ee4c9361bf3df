"""Prediction records and their scores: what every evaluation (``rag-evaluate``, the studies, validation and
test in training) writes and reads.

A :class:`Prediction` is one answered question: the question, its gold answers, the generated answer and
every passage the generator read (:class:`RetrievedPassage`: retrieval score, prior p(z|x), posterior
p(z|x,y)). ``predictions.jsonl`` holds one :meth:`Prediction.to_dict` per line;
:meth:`Prediction.from_dict` reads those lines back, including files written before this module existed
(the keys are the same) and partial records (missing keys take their defaults, but a record needs at least
``prediction`` and ``answers``). ``ranked_after`` (written only when there are any) holds the passages the
retriever ranked after the K read, so that recall@k is scored for k above K too (recall@10 at K = 5).

:func:`score_records` averages the per-question scores (EM, F1, answer / gold-passage recall@k) overall and
per set; the metrics themselves are the string functions of :mod:`rag.metrics`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag.errors import RagError
from rag.metrics import exact_match, f1_score, has_answer, regex_match

if TYPE_CHECKING:
    from rag.model import RagAnswer
    from rag.types import Passage, Question

__all__ = [
    "Prediction",
    "PredictionsError",
    "RetrievedPassage",
    "read_predictions",
    "score_records",
    "write_predictions",
]


class PredictionsError(RagError, ValueError):
    """A predictions file with a line that is not a prediction record."""


@dataclass
class RetrievedPassage:
    """One passage the generator read: its retrieval score ``doc_score``, ``prior`` p(z|x) and
    ``posterior`` p(z|x,y) for the generated answer."""

    id: str = ""
    title: str = ""
    text: str = ""
    doc_score: float = 0.0
    prior: float = 0.0
    posterior: float = 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetrievedPassage:
        return cls(**{k: data[k] for k in _PASSAGE_FIELDS if k in data})


@dataclass
class Prediction:
    """One answered question: gold answers, the generated answer with its score log p(y|x), and the passages
    read, best first (empty for a closed-book model). ``dataset`` and ``index`` name the question's set and
    its position there; ``answers_are_regex`` marks CuratedTREC-style regular-expression answers."""

    prediction: str
    answers: list[str]
    id: str = ""
    dataset: str = ""
    index: int = -1
    question: str = ""
    answers_are_regex: bool = False
    gold_passage_ids: list[str] = field(default_factory=list)
    score: float = 0.0
    passages: list[RetrievedPassage] = field(default_factory=list)
    #: passages ranked after the ones read (retrieval score only): for recall@k at k above K
    ranked_after: list[RetrievedPassage] = field(default_factory=list)

    @classmethod
    def from_answer(
        cls,
        question: Question,
        answer: RagAnswer,
        dataset: str = "",
        index: int = -1,
        ranked_after: Sequence[tuple[Passage, float]] = (),
    ) -> Prediction:
        """The record of ``answer`` (from :meth:`rag.model.RagModel.generate`) to ``question``;
        ``ranked_after``: (passage, retrieval score) of the passages ranked after the ones read."""
        return cls(
            ranked_after=[
                RetrievedPassage(id=p.id, title=p.title, text=p.text, doc_score=s) for p, s in ranked_after
            ],
            id=question.id,
            dataset=dataset,
            index=index,
            question=question.question,
            answers=list(question.answers),
            answers_are_regex=question.answers_are_regex,
            gold_passage_ids=list(question.gold_passage_ids),
            prediction=answer.answer,
            score=answer.score,
            passages=[
                RetrievedPassage(
                    id=p.id, title=p.title, text=p.text, doc_score=s, prior=prior, posterior=post
                )
                for p, s, prior, post in zip(
                    answer.passages, answer.doc_scores, answer.doc_priors, answer.doc_posteriors
                )
            ],
        )

    def to_dict(self) -> dict:
        """The JSON-ready record, with the keys (and their order) of ``predictions.jsonl``."""
        out = {key: getattr(self, key) for key in _RECORD_KEYS}
        out["answers"] = list(self.answers)
        out["gold_passage_ids"] = list(self.gold_passage_ids)
        out["passages"] = [asdict(p) for p in self.passages]
        if self.ranked_after:
            out["ranked_after"] = [asdict(p) for p in self.ranked_after]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prediction:
        """A record read from ``predictions.jsonl`` (``KeyError`` without ``prediction`` or ``answers``)."""
        fields = {k: data[k] for k in _RECORD_KEYS if k in data}
        fields["prediction"], fields["answers"] = data["prediction"], list(data["answers"])
        fields["gold_passage_ids"] = list(data.get("gold_passage_ids") or ())
        fields["passages"] = [RetrievedPassage.from_dict(p) for p in data.get("passages") or ()]
        fields["ranked_after"] = [RetrievedPassage.from_dict(p) for p in data.get("ranked_after") or ()]
        return cls(**fields)

    @property
    def key(self) -> tuple[str, int, str]:
        """(dataset, index, id): one question of one set."""
        return (self.dataset, self.index, self.id)

    def exact_match(self) -> float:
        """A regex match for regex answers (CuratedTREC-style), normalised exact match otherwise."""
        match = regex_match if self.answers_are_regex else exact_match
        return match(self.prediction, self.answers)

    def scores(self, ks: Sequence[int]) -> dict[str, float]:
        """EM, F1 (max over gold answers; none for regex answers), answer recall@k and gold-passage
        recall@k (none without gold passage ids) of this question, over the passages read and then those
        ranked after them."""
        answers, regex = self.answers, self.answers_are_regex
        out = {"em": self.exact_match()}
        if not regex:
            out["f1"] = f1_score(self.prediction, answers)
        passages = [*self.passages, *self.ranked_after] if self.passages else []
        if passages:
            first_hit = next(
                (i for i, p in enumerate(passages) if has_answer(p.text, answers, regex=regex)), None
            )
            gold = set(self.gold_passage_ids)
            first_gold = next((i for i, p in enumerate(passages) if p.id in gold), None) if gold else None
            for k in ks:
                out[f"answer_recall@{k}"] = float(first_hit is not None and first_hit < k)
                if gold:
                    out[f"gold_recall@{k}"] = float(first_gold is not None and first_gold < k)
        return out


_PASSAGE_FIELDS = ("id", "title", "text", "doc_score", "prior", "posterior")
_RECORD_KEYS = (
    "id",
    "dataset",
    "index",
    "question",
    "answers",
    "answers_are_regex",
    "gold_passage_ids",
    "prediction",
    "score",
    "passages",
)


def as_prediction(record: Prediction | Mapping[str, Any]) -> Prediction:
    """``record`` itself, or the :class:`Prediction` of a dict read from ``predictions.jsonl``."""
    return record if isinstance(record, Prediction) else Prediction.from_dict(record)


def score_records(records: Iterable[Prediction | Mapping[str, Any]], ks: Sequence[int]) -> dict[str, float]:
    """Mean of every per-question score over ``records`` (predictions, or their dicts), per set and overall.

    Keys: ``em``, ``f1``, ``answer_recall@k``, ``gold_recall@k`` (each averaged over the questions that
    have it: f1 skips regex answers, gold recall questions without gold passages), ``n``; and when the
    records come from several sets, the same keys prefixed ``<set>/``. Recall is given at the number of
    passages read (K) and for the ks up to the number ranked (read, then ``ranked_after``).
    """
    records = [as_prediction(r) for r in records]
    if not records:
        return {}
    n_read = min((len(r.passages) for r in records), default=0)
    n_ranked = min((len(r.passages) + len(r.ranked_after) for r in records), default=0)
    ks = [k for k in sorted(set(ks)) if k <= n_ranked] if n_read else []
    if n_read and n_read not in ks:
        ks = sorted({*ks, n_read})
    groups: dict[str, list[Prediction]] = {"": records}
    sets = list(dict.fromkeys(r.dataset for r in records))
    if len(sets) > 1:
        for name in sets:
            groups[f"{name}/"] = [r for r in records if r.dataset == name]
    out: dict[str, float] = {}
    for prefix, rows in groups.items():
        sums: dict[str, list[float]] = {}
        for r in rows:
            for key, value in r.scores(ks).items():
                sums.setdefault(key, []).append(value)
        order = ["em", "f1", *(f"answer_recall@{k}" for k in ks), *(f"gold_recall@{k}" for k in ks)]
        for key in order:
            if key in sums:
                out[f"{prefix}{key}"] = sum(sums[key]) / len(sums[key])
        out[f"{prefix}n"] = float(len(rows))
    return out


def write_predictions(path: str | os.PathLike, predictions: Iterable[Prediction]) -> Path:
    """Write ``predictions.jsonl`` (one :meth:`Prediction.to_dict` per line), atomically."""
    from rag.data.corpus import write_jsonl

    return write_jsonl(path, (as_prediction(p).to_dict() for p in predictions))


def read_predictions(path: str | os.PathLike) -> list[Prediction]:
    """The predictions of a ``predictions.jsonl`` file; a line that is no prediction record raises
    :class:`PredictionsError` naming the file and line."""
    out = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(Prediction.from_dict(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise PredictionsError(
                    f"{path}:{line_no}: not a prediction record ({err}); rerun the evaluation that wrote it"
                ) from None
    return out
