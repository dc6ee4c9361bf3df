"""Metrics against hand-checked cases (each expected value worked out by hand in the comment)."""

import pytest

from rag.metrics import (
    answer_recall_at_k,
    exact_match,
    f1_score,
    gold_recall_at_k,
    gold_recall_counts,
    has_answer,
    normalize_answer,
    qa_scores,
    regex_match,
)


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The Beatles", "beatles"),
        ("  an  Apple,  a day! ", "apple day"),
        ("Theatre of the absurd", "theatre of absurd"),  # "the" only as a whole word
        ("U.S.A.", "usa"),
        ("$12", "12"),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_max_over_answers():
    assert exact_match("the late 1970s", ["1970s", "late 1970s"]) == 1.0
    assert exact_match("1970", ["1970s"]) == 0.0
    assert exact_match("Denver Broncos!", ["denver broncos"]) == 1.0


def test_f1_hand_checked():
    # pred tokens {denver, broncos, team} vs gold {denver, broncos}: P=2/3, R=1, F1=0.8
    assert f1_score("the Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    # max over golds: "carolina panthers" gives 0; "broncos" gives P=1/3,R=1 -> 0.5
    assert f1_score("the Denver Broncos team", ["Carolina Panthers", "Broncos"]) == pytest.approx(0.5)
    # repeated tokens count with multiplicity: pred [a1 a1] vs gold [a1]: common 1, P=1/2, R=1 -> 2/3
    assert f1_score("paris paris", ["paris"]) == pytest.approx(2 / 3)
    assert f1_score("", ["paris"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to empty


def test_regex_match_anchored_and_case_insensitive():
    pattern = r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t|6,194-meter"  # a real CuratedTrec answer
    assert regex_match("20,320 feet", [pattern]) == 1.0
    assert regex_match("20 400 FOOT tall", [pattern]) == 1.0  # re.match: the prefix matches
    assert regex_match("about 20,320 feet", [pattern]) == 0.0  # anchored at the start
    assert regex_match("anything", ["(unbalanced"]) == 0.0  # a broken pattern never crashes


def test_has_answer_token_sequences():
    text = "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany."
    assert has_answer(text, ["Wilhelm Conrad Röntgen"])
    assert has_answer(text, ["wilhelm conrad rontgen"]) is False  # accents are kept (NFD, not stripped)
    assert has_answer(text, ["1901"])
    assert not has_answer(text, ["190"])  # token boundaries, not substrings
    assert has_answer(text, ["Germany."])  # punctuation is its own token
    assert has_answer("in 1901 to", ["190[01]"], regex=True)


def test_answer_recall_at_k():
    retrieved = [
        ["nothing here", "Paris is the capital", "x"],  # first hit at rank 2
        ["London calling", "y", "z"],  # no hit
        ["Berlin wall", "a", "b"],  # hit at rank 1
    ]
    answers = [["Paris"], ["Rome"], ["Berlin"]]
    assert answer_recall_at_k(retrieved, answers, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}


def test_gold_recall_skips_questions_without_gold():
    retrieved = [["a", "b"], ["c", "d"], ["e", "f"]]
    gold = [["b"], [], ["x", "e"]]
    assert gold_recall_at_k(retrieved, gold, ks=(1, 2)) == {1: 0.5, 2: 1.0}
    assert gold_recall_counts(gold) == (2, 1)
    with pytest.raises(ValueError, match="no question has gold"):
        gold_recall_at_k(retrieved, [[], [], []], ks=(1,))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="answers is empty"):
        exact_match("x", [])
    with pytest.raises(TypeError, match="wrap it in a list"):
        exact_match("x", "x")
    with pytest.raises(ValueError, match="ks must be positive"):
        answer_recall_at_k([["a"]], [["a"]], ks=(0,))
    with pytest.raises(ValueError, match="2 predictions for 1"):
        qa_scores(["a", "b"], [["a"]])


def test_qa_scores_means():
    scores = qa_scores(["Denver Broncos", "wrong"], [["Denver Broncos"], ["right"]])
    assert scores == {"em": 0.5, "f1": 0.5, "n": 2}
    assert qa_scores(["20,320 feet"], [[r"20,?320"]], regex=True) == {"em": 1.0, "n": 1}
