"""The open-domain QA sets from the Hugging Face hub, through :func:`datasets.load_dataset`.

Where a hub is reachable, ``load_questions_from_hub("nq_open", "validation")`` gives the same
:class:`~rag.types.Question` records as :func:`rag.data.qa.read_questions` on the local file. Offline
(``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or no network) it fails at once with
:class:`~rag.data.errors.HubUnavailableError`, whose message says which local file to pass instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rag.data.corpus import RowSkipper
from rag.data.errors import DataError, DataFormatError, HubUnavailableError
from rag.data.qa import parse_answers
from rag.types import Question


@dataclass(frozen=True)
class HubDataset:
    """Where a QA set lives on the hub and which local file replaces it offline."""

    path: str
    config: str | None
    local: str  # what to pass instead, for the offline message


# Hub copies of the sets the paper evaluates on; any other hub name is loaded as-is if it has a question
# column and an answer(s) column.
HUB_DATASETS: dict[str, HubDataset] = {
    "nq_open": HubDataset(
        "google-research-datasets/nq_open",
        None,
        "read_questions('NQ-open.dev.jsonl') or 'topics.dpr.nq.test.txt'",
    ),
    "web_questions": HubDataset(
        "stanfordnlp/web_questions", None, "read_questions('main-test.json') or 'topics.dpr.wq.test.txt'"
    ),
    "trivia_qa": HubDataset(
        "mandarjoshi/trivia_qa", "rc.nocontext", "read_questions('topics.dpr.trivia.test.txt')"
    ),
    "squad": HubDataset("rajpurkar/squad", None, "read_questions('questions.jsonl', format='squad_open')"),
}

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """True when the environment forbids hub access (read at call time, so tests and users can toggle it)."""
    return any(
        os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _connection_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:  # older huggingface_hub
        pass
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:
        pass
    return tuple(errors)


def _unavailable(name: str, split: str, why: str) -> HubUnavailableError:
    spec = HUB_DATASETS.get(name)
    local = spec.local if spec else "rag.data.qa.read_questions(path)"
    return HubUnavailableError(
        f"cannot load {name!r} ({split}) from the Hugging Face hub: {why}. Pass a local file instead: "
        f"{local} (rag.data.qa reads every DPR/NQ/SQuAD/WebQuestions/CuratedTrec format), or use the embedded "
        "mini-wiki: rag.data.miniwiki.load_questions('nq_gold', 'dev')"
    )


def _answers_of(row: Mapping) -> object:
    """The answer strings of one hub row, whichever schema the set uses."""
    value = row.get("answers", row.get("answer"))
    if isinstance(value, Mapping):
        if "text" in value:  # SQuAD: {"text": [...], "answer_start": [...]}
            return list(value["text"])
        if "aliases" in value or "value" in value:  # TriviaQA: the value, then its aliases
            candidates = [value.get("value") or ""] + list(value.get("aliases") or [])
            return [a for a in dict.fromkeys(candidates) if a]
    return list(value) if isinstance(value, list | tuple) else value


def questions_from_dataset(
    dataset: Iterable[Mapping], name: str = "dataset", answers_are_regex: bool = False, strict: bool = True
) -> list[Question]:
    """Convert the rows of a :class:`datasets.Dataset` (or any iterable of dicts) into Questions.

    Understands the hub schemas of nq_open (``answer``: list), web_questions (``answers``: list), SQuAD
    (``answers.text``) and TriviaQA (``answer.value`` + ``answer.aliases``); ids come from ``id``,
    ``question_id`` or ``qId`` when present, else the row number. Errors name ``name`` and the row number.
    """
    where = Path(f"hub:{name}")
    skipper = RowSkipper(where, strict)
    questions = []
    for index, row in enumerate(dataset):
        try:
            question = row.get("question")
            if not isinstance(question, str) or not question.strip():
                raise ValueError("missing or empty 'question'")
            if "answers" not in row and "answer" not in row:
                raise ValueError(f"no 'answer' or 'answers' column (columns: {sorted(row)})")
            answers = _answers_of(row)
            if isinstance(answers, list) and not answers:
                raise ValueError("empty answer list (hidden test answers? use the validation split)")
            qid = next((row[k] for k in ("id", "question_id", "qId") if row.get(k) not in (None, "")), index)
            questions.append(
                Question(
                    id=str(qid),
                    question=question,
                    answers=parse_answers(answers, answers_are_regex),
                    answers_are_regex=answers_are_regex,
                )
            )
        except ValueError as e:
            skipper.bad(None, f"row {index}: {e}")
    skipper.report()
    if not questions:
        raise DataFormatError(where, None, "no questions in the dataset", "check the name and split")
    return questions


def load_questions_from_hub(
    name: str,
    split: str,
    config: str | None = None,
    *,
    strict: bool = True,
    answers_are_regex: bool = False,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> list[Question]:
    """Load a QA set from the hub: a short name of :data:`HUB_DATASETS` (``"nq_open"``, ``"web_questions"``,
    ``"trivia_qa"``, ``"squad"``) or any hub dataset path with question/answer columns.

    Raises :class:`HubUnavailableError` at once when offline or when the hub cannot be reached.
    """
    if hub_offline():
        raise _unavailable(name, split, "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)")
    spec = HUB_DATASETS.get(name)
    path, default_config = (spec.path, spec.config) if spec else (name, None)
    import datasets  # heavy; only the hub path needs it

    try:
        dataset = datasets.load_dataset(
            path, config or default_config, split=split, revision=revision, cache_dir=cache_dir
        )
    except _connection_errors() as e:
        raise _unavailable(name, split, f"the hub is unreachable ({type(e).__name__}: {e})") from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(
            f"no dataset {path!r} on the hub ({e}); known short names: {sorted(HUB_DATASETS)}"
        ) from e
    except ValueError as e:  # datasets' own message for an unknown split or config
        raise DataError(
            f"cannot load {path!r} split {split!r} config {config or default_config!r}: {e}"
        ) from e
    return questions_from_dataset(
        dataset, f"{path}[{split}]", answers_are_regex=answers_are_regex, strict=strict
    )
