"""Answer metrics of open-domain QA: SQuAD normalisation, exact match, token F1, regex match, recall@k.

Exact match and F1 follow the official SQuAD v1.1 evaluation script (Rajpurkar et al. 2016), which the
RAG paper uses for its open-domain QA tables; regex match follows DrQA / DPR for CuratedTrec, whose answers
are regular expressions. ``has_answer`` follows DPR's retrieval evaluation: a gold answer occurs in a
passage as a sequence of normalised tokens (or, for regex answers, the pattern is found in the text).
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_answers(answers: Sequence[str]) -> None:
    if isinstance(answers, str):
        raise TypeError(
            f"answers must be a list of strings, got the single string {answers!r}: wrap it in a list"
        )
    if len(answers) == 0:
        raise ValueError("answers is empty: every question needs at least one gold answer")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    _check_answers(answers)
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    if not pred_tokens or not gold_tokens:
        # SQuAD v2 convention: two empty answers agree; an empty one against a non-empty one scores 0
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    n_same = sum(common.values())
    if n_same == 0:
        return 0.0
    precision = n_same / len(pred_tokens)
    recall = n_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """Token-level F1 of the normalised strings, the maximum over the gold answers."""
    _check_answers(answers)
    return max(_f1(prediction, a) for a in answers)


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern | None:
    try:
        return re.compile(pattern, flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except re.error:
        return None


def regex_match(prediction: str, patterns: Sequence[str]) -> float:
    """CuratedTrec exact match: 1.0 if any gold regular expression matches at the start of the prediction.

    As DrQA's ``regex_match_score``: ``re.match`` (anchored at the start), case-insensitive; a pattern that
    does not compile counts as no match rather than crashing an evaluation.
    """
    _check_answers(patterns)
    for pattern in patterns:
        compiled = _compile(pattern)
        if compiled is not None and compiled.match(prediction) is not None:
            return 1.0
    return 0.0


# DPR's SimpleTokenizer: runs of letters/digits, or any other single non-space character.
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]|_", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(unicodedata.normalize("NFD", text).lower())


def has_answer(text: str, answers: Sequence[str], regex: bool = False) -> bool:
    """Whether a passage contains a gold answer (DPR's retrieval criterion).

    String answers: the answer's tokens occur as a contiguous token sequence of the passage (lowercased,
    NFD-normalised, punctuation kept as separate tokens). Regex answers: the pattern is found anywhere.
    """
    _check_answers(answers)
    if regex:
        return any((c := _compile(p)) is not None and c.search(text) is not None for p in answers)
    tokens = _tokens(text)
    for answer in answers:
        ans = _tokens(answer)
        n = len(ans)
        if n == 0:
            continue
        for i in range(len(tokens) - n + 1):
            if tokens[i : i + n] == ans:
                return True
    return False


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def answer_recall_at_k(
    retrieved_texts: Sequence[Sequence[str]],
    answers: Sequence[Sequence[str]],
    ks: Iterable[int] = (1, 5, 10, 20, 50),
    regex: bool = False,
) -> dict[int, float]:
    """Fraction of questions with a gold answer in one of their top-k passages, for each k.

    ``retrieved_texts[b]`` are the passages of question b, best first. A question with fewer than k
    retrieved passages is scored on what it has.
    """
    if len(retrieved_texts) != len(answers):
        raise ValueError(f"{len(retrieved_texts)} retrieval lists for {len(answers)} answer lists")
    if not answers:
        raise ValueError("no questions to score")
    ks = _check_ks(ks)
    hits = {k: 0 for k in ks}
    for texts, golds in zip(retrieved_texts, answers):
        first = next((i for i, t in enumerate(texts) if has_answer(t, golds, regex=regex)), None)
        for k in ks:
            hits[k] += first is not None and first < k
    return {k: hits[k] / len(answers) for k in ks}


def gold_recall_at_k(
    retrieved_ids: Sequence[Sequence[str]],
    gold_ids: Sequence[Sequence[str]],
    ks: Iterable[int] = (1, 5, 10, 20, 50),
) -> dict[int, float]:
    """Fraction of questions with one of their gold passages among the top-k retrieved ids.

    Questions without gold passage ids are skipped (they cannot be scored); ``gold_recall_counts`` says how
    many were scored.
    """
    if len(retrieved_ids) != len(gold_ids):
        raise ValueError(f"{len(retrieved_ids)} retrieval lists for {len(gold_ids)} gold lists")
    ks = _check_ks(ks)
    hits = {k: 0 for k in ks}
    scored = 0
    for ids, golds in zip(retrieved_ids, gold_ids):
        if not golds:
            continue
        scored += 1
        gold = set(golds)
        first = next((i for i, doc_id in enumerate(ids) if doc_id in gold), None)
        for k in ks:
            hits[k] += first is not None and first < k
    if scored == 0:
        raise ValueError("no question has gold passage ids: gold-passage recall cannot be computed")
    return {k: hits[k] / scored for k in ks}


def gold_recall_counts(gold_ids: Sequence[Sequence[str]]) -> tuple[int, int]:
    """(scored, skipped): how many questions have gold passage ids, and how many do not."""
    scored = sum(1 for g in gold_ids if g)
    return scored, len(gold_ids) - scored


def qa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]], regex: bool = False) -> dict:
    """Mean exact match (regex match when ``regex``) and F1 over a set of predictions, in [0, 1]."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    if regex:
        em = [regex_match(p, a) for p, a in zip(predictions, answers)]
        return {"em": sum(em) / len(em), "n": len(em)}
    em = [exact_match(p, a) for p, a in zip(predictions, answers)]
    f1 = [f1_score(p, a) for p, a in zip(predictions, answers)]
    return {"em": sum(em) / len(em), "f1": sum(f1) / len(f1), "n": len(em)}
