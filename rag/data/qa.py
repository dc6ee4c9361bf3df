"""Open-domain QA question sets: readers for the formats the field ships them in, and a JSONL writer.

Formats (``format=``), each gzip-transparent:

- ``"nq_open"``: NQ-open JSONL ``{"question", "answer": [...]}``; DPR's JSONL topics (WebQuestions, SQuAD)
  have the same shape, so ``"dpr_jsonl"`` is the same reader.
- ``"curatedtrec_jsonl"``: the same shape with answers that are regular expressions (DPR's CuratedTrec).
- ``"dpr_tsv"``: DPR's tab-separated topics ``question<TAB>['ans', ...]`` with CSV quoting, parsed as DPR
  parses them: one :mod:`csv` pass, then :func:`ast.literal_eval` on the answer column. (DPR's TriviaQA file
  quotes some questions twice; one pass keeps the question exactly as DPR and RAG saw it.)
- ``"curatedtrec_tsv"``: ``id<TAB>factoid<TAB>question<TAB>answer-regex`` (no quoting).
- ``"webquestions_json"``: a JSON list of ``{"qId", "qText", "answers"}``.
- ``"squad_open"``: JSONL ``{"id", "question", "answers", "is_impossible", "title", "passage_id"}``; the gold
  passage id names the SQuAD paragraph; unanswerable (``is_impossible``) questions are left out.
- ``"nq_gold"``: ``nq-open-oracle.jsonl.gz`` ``{"question", "answers", "ctxs": [{"title", "text", "isgold"}]}``;
  gold passage ids are :func:`rag.data.corpus.nq_gold_passage_id` of the gold contexts, which is how the
  ``"nq_gold"`` passage reader names them, and question ids ``nq_gold:<hash of the question>``.
- ``"rag"``: ``{"id", "question", "answers", "gold_passage_ids", "answers_are_regex"}`` JSONL, what
  :func:`write_questions` writes (the mini-wiki's question files).

Questions without an id in the file get their 0-based row number. ``"auto"`` detects the format from the
first line; the one ambiguity, plain versus regex answers in ``{"question", "answer"}`` JSONL, is settled by
the file name (``curated`` in it means regex) or by passing ``format=``.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from rag.data.corpus import (
    RowSkipper,
    first_data_line,
    gold_contexts,
    iter_jsonl_rows,
    nq_gold_passage_id,
    open_text,
    progress_bar,
    write_jsonl,
)
from rag.data.errors import DataFormatError
from rag.types import Question

log = logging.getLogger(__name__)

QUESTION_FORMATS = (
    "nq_open",
    "dpr_jsonl",
    "curatedtrec_jsonl",
    "dpr_tsv",
    "curatedtrec_tsv",
    "webquestions_json",
    "squad_open",
    "nq_gold",
    "rag",
)


def nq_gold_question_id(question: str) -> str:
    """Stable id of an NQ-gold question (the source has none); also the key of the mini-wiki's NQ split."""
    return f"nq_gold:{hashlib.sha256(question.encode()).hexdigest()[:16]}"


def detect_question_format(path: str | os.PathLike) -> str:
    """Guess the question format from the first line; raises :class:`DataFormatError` when it cannot."""
    path = Path(path)
    line = first_data_line(path, "question file")
    hint = f"pass format= one of {QUESTION_FORMATS}"
    stripped = line.lstrip()
    if stripped.startswith("["):
        return "webquestions_json"
    if stripped.startswith("{"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, 1, f"first line is not valid JSON ({e.msg})", hint) from None
        keys = set(row) if isinstance(row, dict) else set()
        if "ctxs" in keys:
            return "nq_gold"
        if "gold_passage_ids" in keys or "answers_are_regex" in keys:
            return "rag"
        if "passage_id" in keys or "is_impossible" in keys:
            return "squad_open"
        if {"question", "answer"} <= keys:
            return "curatedtrec_jsonl" if "curated" in path.name.lower() else "nq_open"
        raise DataFormatError(path, 1, f"unknown question JSON keys {sorted(keys)}", hint)
    fields = line.split("\t")
    if len(fields) == 4 and fields[1] == "factoid":
        return "curatedtrec_tsv"
    if len(fields) == 2:
        return "dpr_tsv"
    raise DataFormatError(path, 1, "cannot detect the question format from the first line", hint)


def parse_answers(value, regex: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError("answers must be a list of strings, got a single string")
    if not isinstance(value, list | tuple):
        raise ValueError(f"answers must be a list of strings, got {type(value).__name__}")
    if not value:
        raise ValueError("empty answer list")
    answers = []
    for a in value:
        if not isinstance(a, str):
            raise ValueError(f"answer {a!r} is not a string")
        if not a.strip():
            raise ValueError("empty answer string")
        if regex:
            try:
                re.compile(a)
            except re.error as e:
                raise ValueError(f"answer {a!r} is not a valid regular expression ({e})") from None
        if a not in answers:  # SQuAD lists the same span once per annotator
            answers.append(a)
    return tuple(answers)


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise ValueError(f"missing key {key!r}")
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is a {type(value).__name__}, expected a string")
    if not value.strip():
        raise ValueError(f"empty {key!r}")
    return value


def _question_from_json(row: dict, format: str, index: int) -> Question | None:
    """One JSON row as a Question; None for rows the format leaves out on purpose (SQuAD unanswerables)."""
    if format in ("nq_open", "dpr_jsonl", "curatedtrec_jsonl"):
        regex = format == "curatedtrec_jsonl"
        return Question(
            id=str(row.get("id", index)),
            question=_text(row, "question"),
            answers=parse_answers(row.get("answer", row.get("answers")), regex),
            answers_are_regex=regex,
        )
    if format == "squad_open":
        if row.get("is_impossible"):
            return None
        return Question(
            id=_text(row, "id"),
            question=_text(row, "question"),
            answers=parse_answers(row.get("answers"), False),
            gold_passage_ids=(_text(row, "passage_id"),),
        )
    if format == "nq_gold":
        question = _text(row, "question")
        gold = tuple(dict.fromkeys(nq_gold_passage_id(c["title"], c["text"]) for c in gold_contexts(row)))
        return Question(
            id=nq_gold_question_id(question),
            question=question,
            answers=parse_answers(row.get("answers"), False),
            gold_passage_ids=gold,
        )
    if format == "webquestions_json":
        return Question(
            id=str(row.get("qId", index)),
            question=_text(row, "qText"),
            answers=parse_answers(row.get("answers"), False),
        )
    if format == "rag":
        regex = row.get("answers_are_regex", False)
        gold = row.get("gold_passage_ids", [])
        if not isinstance(regex, bool):
            raise ValueError('"answers_are_regex" must be true or false')
        if not isinstance(gold, list) or not all(isinstance(g, str) and g for g in gold):
            raise ValueError('"gold_passage_ids" must be a list of non-empty strings')
        return Question(
            id=_text(row, "id"),
            question=_text(row, "question"),
            answers=parse_answers(row.get("answers"), regex),
            gold_passage_ids=tuple(gold),
            answers_are_regex=regex,
        )
    raise AssertionError(format)


def _raw_questions(
    path: Path, format: str, skipper: RowSkipper
) -> Iterator[tuple[int | None, Question | None]]:
    with open_text(path, "question file") as f:
        if format == "dpr_tsv":
            reader = csv.reader(f, delimiter="\t", quotechar='"')
            lineno, index = 0, 0
            try:
                for row in progress_bar(reader, path, "reading"):
                    start, lineno = lineno + 1, reader.line_num
                    if not any(field.strip() for field in row):
                        continue
                    index += 1
                    if len(row) != 2:
                        skipper.bad(
                            start, f"expected 2 tab-separated fields (question, answers), got {len(row)}"
                        )
                        continue
                    try:
                        answers = ast.literal_eval(row[1])
                    except (ValueError, SyntaxError):
                        skipper.bad(start, f"answer column {row[1][:60]!r} is not a Python list literal")
                        continue
                    try:
                        question = _text({"question": row[0]}, "question")
                        yield (
                            start,
                            Question(
                                id=str(index - 1), question=question, answers=parse_answers(answers, False)
                            ),
                        )
                    except ValueError as e:
                        skipper.bad(start, str(e))
            except csv.Error as e:
                raise DataFormatError(path, reader.line_num, f"broken CSV quoting ({e})", "") from None
            return
        if format == "curatedtrec_tsv":
            for lineno, line in enumerate(progress_bar(f, path, "reading"), start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) != 4:
                    skipper.bad(
                        lineno,
                        f"expected 4 tab-separated fields (id, type, question, regex), got {len(fields)}",
                    )
                    continue
                try:
                    question = _text({"question": fields[2]}, "question")
                    answers = parse_answers([fields[3]], True)
                except ValueError as e:
                    skipper.bad(lineno, str(e))
                    continue
                yield (
                    lineno,
                    Question(id=fields[0], question=question, answers=answers, answers_are_regex=True),
                )
            return
        if format == "webquestions_json":
            for index, (lineno, row) in enumerate(_json_list_records(path, f.read())):
                if not isinstance(row, dict):
                    skipper.bad(lineno, f"record {index} is not a JSON object")
                    continue
                try:
                    yield lineno, _question_from_json(row, format, index)
                except ValueError as e:
                    skipper.bad(lineno, f"record {index}: {e}")
            return
        index = 0
        for lineno, row, error in progress_bar(iter_jsonl_rows(f), path, "reading"):
            index += 1
            if row is None:
                skipper.bad(lineno, error)
                continue
            try:
                yield lineno, _question_from_json(row, format, index - 1)
            except ValueError as e:
                skipper.bad(lineno, str(e))


def _json_list_records(path: Path, text: str) -> Iterator[tuple[int, object]]:
    """(line number, element) for each element of a JSON list, so that errors can name the line."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, 0).end()
    if not text.startswith("[", pos):
        raise DataFormatError(path, None, "expected a JSON list of questions", "")
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        lineno = text.count("\n", 0, pos) + 1
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, f"invalid JSON ({e.msg})", "") from None
        yield lineno, element
        pos = ws.match(text, pos).end()
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            raise DataFormatError(
                path, text.count("\n", 0, pos) + 1, "invalid JSON (expected ',' or ']')", ""
            )
        pos = ws.match(text, pos + 1).end()


def iter_questions(path: str | os.PathLike, format: str = "auto", strict: bool = True) -> Iterator[Question]:
    """Stream the questions of a file (see the module docstring for formats).

    With ``strict`` a malformed row (bad JSON, missing field, empty question, empty answer list, invalid
    regex) raises :class:`DataFormatError` naming the file and line; without it such rows are skipped,
    counted and reported in one :class:`SkippedRowsWarning`.
    """
    path = Path(path)
    if format == "auto":
        format = detect_question_format(path)
    elif format not in QUESTION_FORMATS:
        raise ValueError(f"unknown question format {format!r}; expected 'auto' or one of {QUESTION_FORMATS}")
    skipper = RowSkipper(path, strict)
    n, n_unanswerable = 0, 0
    for _, question in _raw_questions(path, format, skipper):
        if question is None:
            n_unanswerable += 1
            continue
        n += 1
        yield question
    skipper.report()
    if n_unanswerable:
        log.info("left out %d unanswerable (is_impossible) questions of %s", n_unanswerable, path)
    if n == 0:
        raise DataFormatError(
            path, None, "no questions in the file", "pass a file with at least one question"
        )


def read_questions(path: str | os.PathLike, format: str = "auto", strict: bool = True) -> list[Question]:
    """Read a whole question file; see :func:`iter_questions` for the arguments and errors."""
    return list(iter_questions(path, format, strict))


def question_to_dict(q: Question) -> dict:
    return {
        "id": q.id,
        "question": q.question,
        "answers": list(q.answers),
        "gold_passage_ids": list(q.gold_passage_ids),
        "answers_are_regex": q.answers_are_regex,
    }


def write_questions(path: str | os.PathLike, questions: Iterable[Question]) -> Path:
    """Write questions as ``"rag"`` JSONL, atomically; gzip-compressed when ``path`` ends in ``.gz``."""
    return write_jsonl(path, (question_to_dict(q) for q in questions))
