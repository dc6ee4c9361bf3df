"""Cloze questions made from corpus passages: a self-supervised reader warm-up.

A sentence of a passage with one span (a number, a date, a capitalised name) replaced by a question word,
e.g. ``"The Normans gave their name to what, a region in France."`` -> ``"Normandy"``, with the passage as
its gold passage. Reading the passage to find the sentence and copying the span that fills the blank is the
skill extractive QA needs, and a generator initialised from a sentence encoder (MiniLM) does not have it:
the mini-wiki reference model learns it from these questions before it sees a real one. This follows the
cloze questions of Lewis, Denoyer and Riedel (2019, "Unsupervised Question Answering by Cloze
Translation"), without their translation into natural questions.

Questions are a function of the passages and the seed alone. Passages that are gold for held-out questions
(and, for SQuAD pieces, every passage of the same article) are left out, so that no held-out answer
sentence is ever trained on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from rag.data.errors import DataError
from rag.types import Passage, Question

__all__ = ["CLOZE_KINDS", "ClozeError", "cloze_questions", "miniwiki_cloze"]

CLOZE_KINDS = ("span", "phrase")

# a span to blank out: a number (with an optional unit), or a run of capitalised words that may be joined
# by of / the / de / and (e.g. "University of Notre Dame")
_SPAN = re.compile(
    r"\b(?:\d[\d,.]*(?:\s(?:million|billion|percent|per cent|years?|km|miles|people|BC|AD))?"
    r"|[A-Z][\w'\-]+(?:\s(?:of\s|the\s|de\s|and\s)?[A-Z][\w'\-]+)*)"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


class ClozeError(DataError, ValueError):
    """Cloze settings that cannot make questions."""


def _sentences(text: str, min_words: int, max_words: int) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if min_words <= len(s.split()) <= max_words]


def _candidates(sentence: str, max_answer_words: int) -> list[re.Match]:
    # never the sentence's first word (capitalised anyway) and never a span that is the whole sentence
    out = []
    for m in _SPAN.finditer(sentence):
        span = m.group().strip(" ,.")
        if m.start() == 0 or not span or len(span.split()) > max_answer_words:
            continue
        out.append(m)
    return out


def held_out_passage_ids(question_sets: Iterable[Sequence[Question]]) -> tuple[set[str], set[str]]:
    """The gold passage ids of ``question_sets`` and the SQuAD articles (``squad:<title>``) they belong to."""
    ids: set[str] = set()
    for questions in question_sets:
        for q in questions:
            ids.update(q.gold_passage_ids)
    articles = {pid.split("#", 1)[0] for pid in ids if pid.startswith("squad:") and "#" in pid}
    return ids, articles


def cloze_questions(
    passages: Sequence[Passage],
    *,
    held_out: Iterable[Sequence[Question]] = (),
    per_passage: int = 1,
    wh_word: str = "what",
    min_sentence_words: int = 6,
    max_sentence_words: int = 40,
    max_answer_words: int = 5,
    kinds: Sequence[str] = ("span",),
    seed: int = 0,
    limit: int | None = None,
) -> list[Question]:
    """Up to ``per_passage`` cloze questions from each passage (each from a different sentence).

    Two kinds of blank, taken in turn (``kinds``): ``span``, a name or a number (an answer as SQuAD and NQ
    have them); ``phrase``, a run of 4 to 12 consecutive words, which gives the decoder many tokens to copy
    per passage read (the copying itself is what a BERT-initialised decoder lacks).

    Args:
        passages: the corpus.
        held_out: question sets whose gold passages (and SQuAD articles) must not be used.
        per_passage: questions per passage at most.
        wh_word: what replaces the blanked span.
        min_sentence_words, max_sentence_words: sentences outside this range of words are skipped (a cloze
            question is never cut to fit the generator's input, so it must stay short).
        max_answer_words: longer spans are never blanked.
        seed: the draw of sentences and spans (per passage: the result does not depend on passage order).
        limit: keep the first ``limit`` questions (None: all).
    """
    unknown = [k for k in kinds if k not in CLOZE_KINDS]
    if not kinds or unknown:
        raise ClozeError(f"kinds must be a non-empty list of {CLOZE_KINDS}, got {list(kinds)}")
    if per_passage < 1:
        raise ClozeError(f"per_passage must be at least 1, got {per_passage}")
    if not 1 <= min_sentence_words <= max_sentence_words:
        raise ClozeError(
            f"need 1 <= min_sentence_words <= max_sentence_words, got {min_sentence_words}, {max_sentence_words}"
        )
    if not wh_word.strip():
        raise ClozeError("wh_word must be a non-empty word, e.g. 'what'")
    held_ids, held_articles = held_out_passage_ids(held_out)
    out: list[Question] = []
    for p in passages:
        if p.id in held_ids or p.id.split("#", 1)[0] in held_articles:
            continue
        rng = random.Random(f"{seed}:{p.id}")
        sentences = _sentences(p.text, min_sentence_words, max_sentence_words)
        rng.shuffle(sentences)
        made = 0
        for sentence in sentences:
            kind = kinds[made % len(kinds)]
            if kind == "span":
                candidates = _candidates(sentence, max_answer_words)
                if not candidates:
                    continue
                m = rng.choice(candidates)
                start, end = m.start(), m.end()
            else:
                words = list(re.finditer(r"\S+", sentence))
                if len(words) < 7:
                    continue
                n = rng.randint(4, min(12, len(words) - 3))
                first = rng.randint(2, len(words) - n)
                start, end = words[first].start(), words[first + n - 1].end()
            answer = sentence[start:end].strip(" ,.;:")
            if not answer:
                continue
            question = f"{sentence[:start]}{wh_word}{sentence[end:]}".strip()
            out.append(
                Question(
                    id=f"cloze:{p.id}:{made}",
                    question=question,
                    answers=(answer,),
                    gold_passage_ids=(p.id,),
                )
            )
            made += 1
            if made == per_passage:
                break
        if limit is not None and len(out) >= limit:
            return out[:limit]
    if not out:
        raise ClozeError(
            "no cloze question could be made: every passage is held out or has no sentence with a span to blank"
        )
    return out


def miniwiki_cloze(
    held_out_splits: Sequence[str] = ("dev", "test"),
    per_passage: int = 1,
    kinds: Sequence[str] = ("span",),
    seed: int = 0,
    limit: int | None = None,
) -> list[Question]:
    """Cloze questions over the mini-wiki corpus, leaving out the gold passages (and SQuAD articles) of every
    question set's ``held_out_splits``."""
    from rag.data import miniwiki

    for split in held_out_splits:
        if split not in miniwiki.SPLITS:
            raise ClozeError(f"held_out_splits: {split!r} is not a mini-wiki split {miniwiki.SPLITS}")
    held = [miniwiki.load_questions(d, s) for d in miniwiki.DATASETS for s in held_out_splits]
    return cloze_questions(
        miniwiki.load_corpus(), held_out=held, per_passage=per_passage, kinds=kinds, seed=seed, limit=limit
    )
