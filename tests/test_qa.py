"""Question readers on real rows of every format, the writer, and bad input."""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

from rag.data.corpus import read_passages
from rag.data.errors import DataFileNotFoundError, DataFormatError, SkippedRowsWarning
from rag.data.qa import detect_question_format, read_questions, write_questions
from rag.types import Question

DATA = Path(__file__).parent / "fixtures" / "data"
BAD = DATA / "bad"


def _json_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_nq_open_jsonl():
    questions = read_questions(DATA / "NQ-open.dev.jsonl")
    assert questions[0] == Question(
        "0", "when was the last time anyone was on the moon", ("14 December 1972 UTC", "December 1972")
    )
    rows = _json_lines(DATA / "NQ-open.dev.jsonl")
    assert [(q.question, list(q.answers)) for q in questions] == [(r["question"], r["answer"]) for r in rows]
    assert [q.id for q in questions] == ["0", "1", "2"]


def test_dpr_tsv_topics_with_crlf_line_ends():
    assert b"\r\n" in (DATA / "topics.dpr.nq.test.txt").read_bytes()
    questions = read_questions(DATA / "topics.dpr.nq.test.txt")
    assert questions[0] == Question(
        "0", "who got the first nobel prize in physics", ("Wilhelm Conrad Röntgen",)
    )
    assert questions[2].answers == ("Olivia", "MFSK")
    assert not any("\r" in q.question or "\r" in a for q in questions for a in q.answers)


def test_dpr_tsv_topics_parse_csv_quoting_once_as_dpr_does():
    questions = read_questions(DATA / "topics.dpr.trivia.test.txt")
    assert questions[1].answers == ("Scorpio", "Skorpio", "Scorpio (disambiguation)")
    # line 4 quotes the answer column: one CSV pass turns ""Hitler's health"" into "Hitler's health"
    raw = (DATA / "topics.dpr.trivia.test.txt").read_text(encoding="utf-8").splitlines()[3]
    assert '""Hitler\'s health""' in raw
    assert "Hitler's health" in questions[3].answers and "Adolf Hitler" in questions[3].answers
    assert len(questions[3].answers) == len(
        set(ast.literal_eval(raw.split("\t")[1][1:-1].replace('""', '"')))
    )
    # the file quotes some questions twice; DPR's reader (csv, then eval) keeps the inner quoting
    assert questions[3].question == '"Who was the target of the failed ""Bomb Plot"" of 1944?"'


def test_dpr_jsonl_topics_plain_and_regex_answers():
    wq = read_questions(DATA / "topics.dpr.wq.test.txt")
    assert wq[0] == Question(
        "0", "what does jamaican people speak?", ("Jamaican Creole English Language", "Jamaican English")
    )
    curated = read_questions(DATA / "topics.dpr.curated.test.txt")
    assert all(q.answers_are_regex for q in curated)
    assert curated[1].answers == ("After the Fall|Finishing the Play",)
    assert re.search(curated[0].answers[0], "Mount McKinley is 20,320 feet high")
    # the same file read as plain answers when asked explicitly
    assert not read_questions(DATA / "topics.dpr.curated.test.txt", format="dpr_jsonl")[0].answers_are_regex


def test_curatedtrec_tsv():
    questions = read_questions(DATA / "large2470-test.tsv")
    assert questions[0].id == "1669" and questions[0].question == "How tall is Mount McKinley?"
    assert all(q.answers_are_regex and len(q.answers) == 1 for q in questions)
    assert (
        questions[3].question == 'What country is know as the "Land of the Rising Sun"?'
    )  # no CSV unquoting
    pacino = questions[4]
    assert pacino.answers == ("5\\s*(f(oo|ee)?t|').*6\\s*(in(ch)?(es)?|\")|1.7.*cm|1\\.7",)
    assert re.search(pacino.answers[0], "Al Pacino is 5 ft 6 in tall")
    # DPR's JSONL copy of the same set has the same first questions and regexes
    dpr = read_questions(DATA / "topics.dpr.curated.test.txt")
    assert [(q.question, q.answers) for q in dpr] == [(q.question, q.answers) for q in questions[:3]]


def test_webquestions_json_list():
    questions = read_questions(DATA / "main-val.json")
    assert questions[0] == Question(
        "wqr000004", "what kind of money to take to bahamas?", ("Bahamian dollar",)
    )
    assert [q.id for q in questions] == ["wqr000004", "wqr000009", "wqr000014"]


def test_squad_open_keeps_the_gold_paragraph_and_merges_repeated_answers(tmp_path):
    questions = read_questions(DATA / "squad_questions.jsonl")
    rows = _json_lines(DATA / "squad_questions.jsonl")
    assert [q.id for q in questions] == [r["id"] for r in rows]
    assert questions[0] == Question(
        "5725b33f6a3fe71400b8952d",
        "When did the 1973 oil crisis begin?",
        ("October 1973", "October", "1973"),
        gold_passage_ids=("1973_oil_crisis#0",),
    )
    passages = {p.id: p for p in read_passages(DATA / "squad_passages.jsonl")}
    for q in questions:  # the answer occurs in the gold paragraph
        assert any(a in passages[q.gold_passage_ids[0]].text for a in q.answers)
    # repeated answer strings (one per annotator) are merged; unanswerable questions are left out
    rows[0]["answers"] = ["October 1973", "October 1973", "1973"]
    rows[1]["is_impossible"] = True
    path = tmp_path / "squad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = read_questions(path)
    assert edited[0].answers == ("October 1973", "1973")
    assert [q.id for q in edited] == [r["id"] for r in rows if not r["is_impossible"]]


def test_nq_gold_questions_point_at_the_nq_gold_passages():
    questions = read_questions(DATA / "nq-open-oracle.jsonl.gz")
    passages = {p.id: p for p in read_passages(DATA / "nq-open-oracle.jsonl.gz")}
    rows = _json_lines(DATA / "nq-open-oracle.jsonl.gz")
    assert [q.question for q in questions] == [r["question"] for r in rows]
    for q, row in zip(questions, rows):
        assert q.id == "nq_gold:" + hashlib.sha256(row["question"].encode()).hexdigest()[:16]
        (gold,) = q.gold_passage_ids
        assert passages[gold].text == row["ctxs"][0]["text"]
        assert any(a in passages[gold].text for a in q.answers)
    assert questions[2].gold_passage_ids == questions[3].gold_passage_ids  # the shared gold passage


@pytest.mark.parametrize(
    "name, format",
    [
        ("NQ-open.dev.jsonl", "nq_open"),
        ("topics.dpr.nq.test.txt", "dpr_tsv"),
        ("topics.dpr.trivia.test.txt", "dpr_tsv"),
        ("topics.dpr.wq.test.txt", "nq_open"),
        ("topics.dpr.curated.test.txt", "curatedtrec_jsonl"),
        ("large2470-test.tsv", "curatedtrec_tsv"),
        ("main-val.json", "webquestions_json"),
        ("squad_questions.jsonl", "squad_open"),
        ("nq-open-oracle.jsonl.gz", "nq_gold"),
    ],
)
def test_auto_detection_and_write_read_round_trip(name, format, tmp_path):
    assert detect_question_format(DATA / name) == format
    questions = read_questions(DATA / name, format=format)
    assert read_questions(DATA / name) == questions
    out = write_questions(tmp_path / "q.jsonl.gz", questions)
    assert detect_question_format(out) == "rag"
    assert read_questions(out) == questions


# ---------------------------------------------------------------------------------------------------- bad input


def test_a_missing_file_is_one_clear_error():
    with pytest.raises(DataFileNotFoundError, match="question file not found: .*nope.jsonl"):
        read_questions(DATA / "nope.jsonl")


@pytest.mark.parametrize(
    "name, line, reason, n_good",
    [
        ("questions_empty_answers.jsonl", 2, "empty answer list", 1),
        ("questions_empty_question.jsonl", 3, "empty 'question'", 2),
        ("questions_answer_not_list.jsonl", 1, "a single string", 0),
        ("topics_bad_answers.txt", 2, "not a Python list literal", 1),
        ("curatedtrec_bad_regex.tsv", 2, "not a valid regular expression", 1),
        ("webquestions_missing_qtext.json", 3, "record 1: missing key 'qText'", 1),
        ("nq_gold_no_gold.jsonl", 1, "isgold", 0),
    ],
)
def test_a_malformed_row_names_file_and_line_or_is_skipped_and_counted(name, line, reason, n_good):
    with pytest.raises(DataFormatError, match=rf"{name}:{line}: .*{re.escape(reason)}"):
        read_questions(BAD / name)
    with pytest.warns(
        SkippedRowsWarning, match=rf"skipped 1 malformed rows in .*{name} \(first at line {line}"
    ):
        if n_good == 0:
            with pytest.raises(DataFormatError, match="no questions in the file"):
                read_questions(BAD / name, strict=False)
        else:
            assert len(read_questions(BAD / name, strict=False)) == n_good


def test_empty_file_and_unknown_format():
    with pytest.raises(DataFormatError, match="empty"):
        read_questions(BAD / "empty.jsonl")
    with pytest.raises(ValueError, match="unknown question format 'csv'"):
        read_questions(DATA / "NQ-open.dev.jsonl", format="csv")
    with pytest.raises(DataFormatError, match="unknown question JSON keys"):
        read_questions(DATA / "squad_passages.jsonl")
