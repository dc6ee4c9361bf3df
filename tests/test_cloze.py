"""Cloze questions from corpus passages (rag.data.cloze): well-formed, held-out passages excluded, seeded."""

from __future__ import annotations

import pytest

from rag.data.cloze import ClozeError, cloze_questions, miniwiki_cloze
from rag.types import Passage, Question

PASSAGES = [
    Passage(
        "squad:Normandy#0:0",
        "Normandy",
        "The Normans were the people who gave their name to Normandy, a "
        "region in France. They were descended from Norse raiders led by Rollo in the 10th century. Short.",
    ),
    Passage(
        "squad:Normandy#1:0",
        "Normandy",
        "The duchy of Normandy was founded in 911 by a treaty with King "
        "Charles III of West Francia. Its capital was Rouen for many centuries afterwards.",
    ),
    Passage(
        "nq:42",
        "Paris",
        "Paris is the capital of France and has about 2,100,000 inhabitants in the city "
        "proper. The Seine river flows through the middle of Paris.",
    ),
    Passage(
        "wiki18:7", "nothing", "no capital letters here and no digits in this sentence at all anyway ok."
    ),
]


def test_each_question_blanks_a_span_of_a_sentence_of_its_passage():
    qs = cloze_questions(PASSAGES, per_passage=2, seed=0)
    by_id = {p.id: p for p in PASSAGES}
    assert qs, "cloze questions were made"
    for q in qs:
        passage = by_id[q.gold_passage_ids[0]]
        (answer,) = q.answers
        assert answer in passage.text
        assert "what" in q.question.split() or "what" in q.question
        # putting the answer back where the blank is gives a sentence of the passage
        restored = q.question.replace("what", answer, 1)
        assert restored.rstrip(" ,.") in passage.text or restored in passage.text
        assert q.id.startswith(f"cloze:{passage.id}:")
    # the passage with no span to blank gives none; at most per_passage per passage
    assert not [q for q in qs if q.gold_passage_ids[0] == "wiki18:7"]
    counts = {}
    for q in qs:
        counts[q.gold_passage_ids[0]] = counts.get(q.gold_passage_ids[0], 0) + 1
    assert max(counts.values()) <= 2


def test_same_seed_same_questions_other_seed_may_differ_and_order_does_not_matter():
    a = cloze_questions(PASSAGES, per_passage=1, seed=3)
    b = cloze_questions(list(reversed(PASSAGES)), per_passage=1, seed=3)
    assert sorted(a, key=lambda q: q.id) == sorted(b, key=lambda q: q.id)
    draws = {tuple(q.answers for q in cloze_questions(PASSAGES, per_passage=1, seed=s)) for s in range(8)}
    assert len(draws) > 1


def test_held_out_gold_passages_and_their_squad_articles_are_left_out():
    held = [[Question("q1", "who?", ("Rollo",), gold_passage_ids=("squad:Normandy#1:0",))]]
    qs = cloze_questions(PASSAGES, held_out=held, per_passage=2)
    used = {q.gold_passage_ids[0] for q in qs}
    assert used == {"nq:42"}  # both Normandy pieces are the held-out question's article


def test_long_sentences_are_skipped_and_bad_settings_fail_clearly():
    with pytest.raises(ClozeError, match="no cloze question"):
        cloze_questions(PASSAGES[2:3], max_sentence_words=5, min_sentence_words=1)  # every sentence is longer
    with pytest.raises(ClozeError, match="no cloze question"):
        cloze_questions(PASSAGES[3:])
    with pytest.raises(ClozeError, match="per_passage"):
        cloze_questions(PASSAGES, per_passage=0)
    with pytest.raises(ClozeError, match="min_sentence_words"):
        cloze_questions(PASSAGES, min_sentence_words=10, max_sentence_words=5)
    for q in cloze_questions(PASSAGES, per_passage=3, max_sentence_words=14):
        assert len(q.question.split()) <= 14


def test_miniwiki_cloze_never_uses_a_dev_or_test_article():
    from rag.data import miniwiki

    qs = miniwiki_cloze(per_passage=1, limit=3000)
    held = {
        pid
        for d in miniwiki.DATASETS
        for s in ("dev", "test")
        for q in miniwiki.load_questions(d, s)
        for pid in q.gold_passage_ids
    }
    held_articles = {pid.split("#")[0] for pid in held if pid.startswith("squad:")}
    assert len(qs) == 3000
    for q in qs:
        pid = q.gold_passage_ids[0]
        assert pid not in held and pid.split("#")[0] not in held_articles
    with pytest.raises(ClozeError, match="not a mini-wiki split"):
        miniwiki_cloze(held_out_splits=("testing",))


def test_phrase_blanks_are_runs_of_4_to_12_words_and_kinds_alternate():
    qs = cloze_questions(PASSAGES, per_passage=2, kinds=["span", "phrase"], seed=1)
    by_id = {p.id: p for p in PASSAGES}
    phrases = [q for q in qs if q.id.endswith(":1")]
    spans = [q for q in qs if q.id.endswith(":0")]
    assert phrases and spans
    for q in phrases:
        assert 4 <= len(q.answers[0].split()) <= 12
        assert q.answers[0] in by_id[q.gold_passage_ids[0]].text
    assert all(len(q.answers[0].split()) <= 5 for q in spans)
    with pytest.raises(ClozeError, match="kinds"):
        cloze_questions(PASSAGES, kinds=["sentence"])
