"""Hub loading: the offline failure (at once, with a pointer to local files) and the row conversion."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from rag.data import hub
from rag.data.errors import DataFormatError, HubUnavailableError, SkippedRowsWarning
from rag.data.hub import load_questions_from_hub, questions_from_dataset
from rag.data.qa import read_questions

DATA = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture
def no_load_dataset(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("load_dataset must not be called")

    monkeypatch.setattr(datasets, "load_dataset", fail)


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
def test_offline_fails_at_once_and_says_to_pass_a_local_file(monkeypatch, no_load_dataset, variable):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(variable, "1")
    with pytest.raises(HubUnavailableError, match="offline mode is on") as info:
        load_questions_from_hub("nq_open", "validation")
    message = str(info.value)
    assert "Pass a local file instead" in message and "NQ-open.dev.jsonl" in message
    assert isinstance(info.value, ConnectionError)


def test_an_unreachable_hub_gives_the_same_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def unreachable(path, name=None, **kwargs):
        calls.append((path, name, kwargs["split"]))
        raise ConnectionError("Couldn't reach 'mandarjoshi/trivia_qa' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(HubUnavailableError, match="the hub is unreachable .*Pass a local file instead"):
        load_questions_from_hub("trivia_qa", "validation")
    assert calls == [("mandarjoshi/trivia_qa", "rc.nocontext", "validation")]


def test_a_reachable_hub_goes_through_load_dataset_and_the_converter(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    rows = [json.loads(line) for line in (DATA / "NQ-open.dev.jsonl").read_text().splitlines()]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    assert load_questions_from_hub("nq_open", "validation") == read_questions(DATA / "NQ-open.dev.jsonl")


def test_nq_open_rows_convert_to_the_local_readers_questions():
    rows = [json.loads(line) for line in (DATA / "NQ-open.dev.jsonl").read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)  # the hub's nq_open schema: question, answer (list)
    assert questions_from_dataset(dataset, "nq_open") == read_questions(DATA / "NQ-open.dev.jsonl")


def test_web_questions_squad_and_trivia_qa_schemas():
    wq = datasets.Dataset.from_dict(
        {"url": ["http://www.freebase.com/view/en/jamaica"], "question": ["what does jamaican people speak?"],
         "answers": [["Jamaican Creole English Language", "Jamaican English"]]}
    )  # fmt: skip
    (q,) = questions_from_dataset(wq, "web_questions")
    assert q.answers == ("Jamaican Creole English Language", "Jamaican English") and q.id == "0"

    squad = datasets.Dataset.from_list(
        [{"id": "5725b33f6a3fe71400b8952d", "title": "1973_oil_crisis", "context": "...",
          "question": "When did the 1973 oil crisis begin?",
          "answers": {"text": ["October 1973", "October 1973", "1973"], "answer_start": [34, 34, 42]}}]
    )  # fmt: skip
    (q,) = questions_from_dataset(squad, "squad")
    assert (q.id, q.answers) == ("5725b33f6a3fe71400b8952d", ("October 1973", "1973"))

    trivia = datasets.Dataset.from_list(
        [{"question": "What star sign is Jamie Lee Curtis?", "question_id": "qw_1",
          "answer": {"value": "Scorpio", "aliases": ["Scorpio", "Skorpio", "Scorpio (disambiguation)"],
                     "normalized_value": "scorpio"}}]
    )  # fmt: skip
    (q,) = questions_from_dataset(trivia, "trivia_qa")
    assert (q.id, q.answers) == ("qw_1", ("Scorpio", "Skorpio", "Scorpio (disambiguation)"))


def test_bad_rows_name_the_dataset_and_row():
    hidden = datasets.Dataset.from_list(
        [{"question": "q1?", "answer": {"value": "a", "aliases": ["a"]}},
         {"question": "q2?", "answer": {"value": "", "aliases": []}}]
    )  # fmt: skip
    with pytest.raises(DataFormatError, match=r"hub:trivia_qa\[test\]: row 1: empty answer list"):
        questions_from_dataset(hidden, "trivia_qa[test]")
    with pytest.warns(SkippedRowsWarning, match=r"skipped 1 malformed rows in hub:x \(first: row 1: empty"):
        assert [q.question for q in questions_from_dataset(hidden, "x", strict=False)] == ["q1?"]
    no_answers = datasets.Dataset.from_dict({"question": ["q?"], "label": [1]})
    with pytest.raises(DataFormatError, match="no 'answer' or 'answers' column"):
        questions_from_dataset(no_answers, "other")


def test_offline_flag_values(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for value, offline in [("1", True), ("ON", True), ("true", True), ("0", False), ("", False)]:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub.hub_offline() is offline
