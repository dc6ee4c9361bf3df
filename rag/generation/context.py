"""Generator inputs in the paper's form ``title / text // question``, and the target labels.

For each of the B questions and each of its K retrieved passages the generator reads one string

    {prefix}{title}{title_sep}{text}{doc_sep}{question}      e.g.  "Aaron / Aaron is a prophet ... // who is aaron"

with transformers' separators (``title_sep=" / "``, ``doc_sep=" // "``), its title clean-up (surrounding
double quotes dropped, as DPR's titles carry them) and its double-space collapse, so that an input that fits
is token for token what ``RagRetriever.postprocess_docs`` produces. Two deliberate differences:

- The question is the ORIGINAL string. transformers' RAG feeds the generator the question decoded from the
  question encoder's ids, i.e. lowercased and re-spaced by BERT's uncased WordPiece.
- The question is never truncated. transformers tokenizes the whole string and cuts from the right, so a long
  passage cuts the question off (the generator then answers a question it cannot see). Here the question's
  tokens are reserved and the passage text is cut instead (then the title, for absurdly long titles); an
  input that still does not fit raises :class:`QuestionTooLongError`.

Closed book: ``passages=None`` (or ``n_docs=0``) gives one input per question holding the question alone,
shape (B, 1, Lc), with ``doc_scores`` zeros (B, 1), so the same marginalisation yields the plain BART NLL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rag.errors import RagError
from rag.types import Passage, Question

__all__ = [
    "ContextError",
    "ContextInputs",
    "EmptyAnswerError",
    "EmptyQuestionError",
    "QuestionTooLongError",
    "build_context_inputs",
    "build_labels",
    "render_context",
]

TITLE_SEP = " / "
DOC_SEP = " // "
#: 200 tokens hold a 100-word passage, its title and a question; the paper's code used 300.
DEFAULT_MAX_CONTEXT_LENGTH = 200
DEFAULT_MAX_TARGET_LENGTH = 32


class ContextError(RagError, ValueError):
    """Bad input to the generator-input builders."""


class EmptyQuestionError(ContextError):
    pass


class EmptyAnswerError(ContextError):
    pass


class QuestionTooLongError(ContextError):
    pass


@dataclass
class ContextInputs:
    """Generator inputs for B questions x K docs (K = 1 for closed book)."""

    context_input_ids: torch.Tensor  # (B, K, Lc) int64, right-padded with the pad id
    context_attention_mask: torch.Tensor  # (B, K, Lc) bool
    doc_scores: torch.Tensor | None  # (B, K): as given (first K columns); zeros (B, 1) for closed book
    strings: list[list[str]] | None = None  # (B, K) rendered inputs after truncation, if asked for
    n_truncated: int = 0  # how many of the B*K inputs had their passage cut

    @property
    def n_docs(self) -> int:
        return self.context_input_ids.shape[1]


def render_context(
    title: str,
    text: str,
    question: str,
    *,
    title_sep: str = TITLE_SEP,
    doc_sep: str = DOC_SEP,
    prefix: str = "",
) -> str:
    """One generator input string, exactly as transformers' ``RagRetriever.postprocess_docs`` builds it."""
    title = title.removeprefix('"').removesuffix('"')
    return (prefix + title + title_sep + text + doc_sep + question).replace("  ", " ")


def build_context_inputs(
    questions: Sequence[str | Question],
    passages: Sequence[Sequence[Passage]] | None,
    tokenizer: Any,
    *,
    n_docs: int | None = None,
    doc_scores: torch.Tensor | None = None,
    max_context_length: int = DEFAULT_MAX_CONTEXT_LENGTH,
    title_sep: str = TITLE_SEP,
    doc_sep: str = DOC_SEP,
    prefix: str = "",
    return_strings: bool = False,
) -> ContextInputs:
    """Tokenize ``title / text // question`` for every question and each of its first K passages.

    Args:
        questions: B question strings (or :class:`~rag.types.Question`, whose ``question`` is used), as
            the user wrote them: never lowercased, never truncated.
        passages: B lists of retrieved passages in rank order; None for closed book.
        tokenizer: the generator's tokenizer, or a :class:`~rag.generation.generator.Generator`.
        n_docs: K, how many passages per question to use (the first K); None: all (every list must be as
            long); 0: closed book.
        doc_scores: (B, >=K) retrieval scores to carry along (the first K columns are kept).
        max_context_length: Lc at most, special tokens included.
        prefix: prepended to every input (some T5 checkpoints expect a task prefix).
        return_strings: also return the rendered strings (after truncation) for display.

    Returns:
        :class:`ContextInputs` with ``context_input_ids``/``context_attention_mask`` (B, K, Lc) padded to
        the longest input in the batch.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise ContextError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; truncating the passage "
            "and not the question needs its character offsets: load the tokenizer with use_fast=True"
        )
    if max_context_length < 1:
        raise ContextError(f"max_context_length must be positive, got {max_context_length}")
    question_strings = _question_strings(questions)
    B = len(question_strings)

    closed_book = passages is None or n_docs == 0
    if closed_book:
        if doc_scores is not None:
            raise ContextError("closed book (passages=None or n_docs=0) takes no doc_scores")
        rows = [[("", "", prefix + q)] for q in question_strings]
        K = 1
    else:
        if len(passages) != B:
            raise ContextError(
                f"got {B} questions but {len(passages)} passage lists; pass one list per question"
            )
        K = n_docs if n_docs is not None else len(passages[0])
        if K < 0:
            raise ContextError(f"n_docs must be >= 0, got {n_docs}")
        for b, docs in enumerate(passages):
            if len(docs) < K:
                raise ContextError(
                    f"question {b} has {len(docs)} passages but n_docs={K}; retrieve at least n_docs passages "
                    "or pass a smaller n_docs"
                )
        if K == 0:
            raise ContextError("every passage list is empty; pass passages=None for closed book")
        rows = [[(d.title, d.text, q) for d in docs[:K]] for q, docs in zip(question_strings, passages)]
        if doc_scores is not None:
            if doc_scores.dim() != 2 or doc_scores.shape[0] != B or doc_scores.shape[1] < K:
                raise ContextError(
                    f"doc_scores must have shape (B, >= n_docs) = ({B}, >={K}), got {tuple(doc_scores.shape)}"
                )
            doc_scores = doc_scores[:, :K]  # (B, K)

    def render(title: str, text: str, q: str) -> str:
        if closed_book:
            return q
        return render_context(title, text, q, title_sep=title_sep, doc_sep=doc_sep, prefix=prefix)

    flat = [item for row in rows for item in row]  # B*K (title, text, question)
    strings = [render(*item) for item in flat]
    # verbose=False: inputs longer than the model's maximum are expected here; they are cut below
    ids = tokenizer(strings, add_special_tokens=True, verbose=False)["input_ids"]
    n_truncated = 0
    for i, (title, text, q) in enumerate(flat):
        if len(ids[i]) <= max_context_length:
            continue
        if closed_book:
            raise QuestionTooLongError(_too_long(i // K, q, len(ids[i]), max_context_length))
        n_truncated += 1
        title, text, strings[i], ids[i] = _fit(tokenizer, title, text, q, render, max_context_length, i // K)

    Lc = max(len(x) for x in ids)
    context_input_ids = torch.full((B * K, Lc), tokenizer.pad_token_id, dtype=torch.long)
    context_attention_mask = torch.zeros((B * K, Lc), dtype=torch.bool)
    for i, x in enumerate(ids):
        context_input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        context_attention_mask[i, : len(x)] = True
    if closed_book:
        doc_scores = torch.zeros(B, 1)
    return ContextInputs(
        context_input_ids=context_input_ids.view(B, K, Lc),  # (B, K, Lc)
        context_attention_mask=context_attention_mask.view(B, K, Lc),  # (B, K, Lc)
        doc_scores=doc_scores,
        strings=[strings[b * K : (b + 1) * K] for b in range(B)] if return_strings else None,
        n_truncated=n_truncated,
    )


def _fit(tokenizer, title: str, text: str, question: str, render, max_length: int, b: int):
    """Cut the passage text (then the title) at token boundaries until the whole input fits."""
    for field in ("text", "title"):
        piece = text if field == "text" else title
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ends = [end for _, end in enc["offset_mapping"]]
        n = len(ends)
        while n > 0:
            cut = _cut_at_word(piece, ends[n - 1])
            candidate = (title, cut) if field == "text" else (cut, "")
            s = render(*candidate, question)
            x = tokenizer(s, add_special_tokens=True, verbose=False)["input_ids"]
            if len(x) <= max_length:
                return *candidate, s, x
            # each passage token kept costs about one input token, so drop as many as overflow
            n -= len(x) - max_length
        if field == "text":
            text = ""
    s = render("", "", question)
    x = tokenizer(s, add_special_tokens=True)["input_ids"]
    if len(x) <= max_length:
        return "", "", s, x
    raise QuestionTooLongError(_too_long(b, question, len(x), max_length))


def _cut_at_word(piece: str, end: int) -> str:
    """``piece[:end]``, backed off to the previous space when ``end`` falls inside a word (a word fragment
    tells the generator nothing and may mislead it)."""
    cut = piece[:end]
    if end < len(piece) and not piece[end].isspace() and not cut[-1:].isspace():
        space = cut.rfind(" ")
        if space > 0:
            cut = cut[:space]
    return cut.rstrip()


def _too_long(b: int, question: str, n_tokens: int, max_length: int) -> str:
    return (
        f"question {b} ({question[:60]!r}...) needs {n_tokens} tokens with the separators and special tokens even "
        f"without any passage text, more than max_context_length={max_length}; questions are never truncated: "
        "raise max_context_length"
    )


def _question_strings(questions) -> list[str]:
    if isinstance(questions, (str, Question)):
        raise ContextError("pass a list of questions (one per batch element), not a single question")
    out = []
    for b, q in enumerate(questions):
        s = q.question if isinstance(q, Question) else q
        if not isinstance(s, str):
            raise ContextError(
                f"question {b} is a {type(s).__name__}, expected a string or rag.types.Question"
            )
        if not s.strip():
            raise EmptyQuestionError(f"question {b} is empty; every example needs a non-empty question")
        out.append(s)
    if not out:
        raise ContextError("no questions given")
    return out


def build_labels(
    answers: Sequence[str],
    tokenizer: Any,
    max_target_length: int = DEFAULT_MAX_TARGET_LENGTH,
    *,
    decoder_start_token_id: int | None = None,
) -> torch.Tensor:
    """Target token ids for teacher forcing and the NLL: labels (B, T), right-padded with the PAD ID.

    Padding convention: positions past the end of an answer hold ``pad_token_id`` (not ``-100``), because the
    marginalisations gather log-probabilities at the label ids (every entry must be a valid index) and mask
    ``labels == pad_token_id`` -- as transformers' RAG does. Every answer ends with eos, and pad is never a
    real target, so the mask is exact. ``-100`` is also accepted by ``Generator.shift_right``.

    The labels are what the decoder must predict after its start token, i.e. the tokenizer's own target form
    without a leading decoder-start token: BART ``<s> y </s>`` (start ``</s>``), T5 ``y </s>`` (start
    ``<pad>``), BERT-initialised BART ``y [SEP]`` (start ``[CLS]``). Pass a
    :class:`~rag.generation.generator.Generator` as ``tokenizer`` (its start id is used), or a tokenizer and
    ``decoder_start_token_id``. Answers longer than ``max_target_length`` are cut, keeping the final eos.
    """
    start = getattr(tokenizer, "decoder_start_token_id", None)
    if decoder_start_token_id is not None:
        start = decoder_start_token_id
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if isinstance(answers, str):
        raise ContextError("pass a list of answer strings (one per question), not a single string")
    if max_target_length < 2:
        raise ContextError(f"max_target_length must be at least 2 (a token and eos), got {max_target_length}")
    for b, a in enumerate(answers):
        if not isinstance(a, str):
            raise ContextError(
                f"answer {b} is a {type(a).__name__}; pass one answer string per question (e.g. answers[0])"
            )
        if not a.strip():
            raise EmptyAnswerError(f"answer {b} is empty; drop the example or give it a non-empty answer")
    if not answers:
        raise ContextError("no answers given")
    ids = tokenizer(list(answers), add_special_tokens=True)["input_ids"]
    special_ids = set(tokenizer.all_special_ids)
    out = []
    for x in ids:
        if start is not None and x and x[0] == start:
            x = x[1:]
        if len(x) > max_target_length:
            # keep the closing eos so that a cut answer still teaches the model to stop
            keep_last = x[-1] in special_ids
            x = x[: max_target_length - 1] + x[-1:] if keep_last else x[:max_target_length]
        out.append(x)
    T = max(len(x) for x in out)
    labels = torch.full((len(out), T), tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
    for b, x in enumerate(out):
        labels[b, : len(x)] = torch.tensor(x, dtype=torch.long)
    return labels
