r"""RagModel: the query encoder, the frozen retriever, the generator and a marginalisation head (paper §2).

A plain ``nn.Module`` (no Lightning) that turns B questions into the RAG training loss and into answers:

    questions --q(x)--> question_embeds (B, D) --frozen index--> n_docs passages, doc_scores (B, K)
    passages + questions --context--> context_input_ids (B, K, Lc) --BART--> seq_logits (B, K, T, V)
    seq_logits, doc_scores, labels --rag_token_nll | rag_sequence_nll--> loss

Retriever modes (the paper's Table 6 ablations plus the closed-book baseline):

- ``learned`` (default): q(x) runs with gradient; the index is searched with a detached copy, and the
  retriever's ``doc_scores = einsum("bd,bkd->bk", q, retrieved_doc_embeds)`` keep q's gradient, so the query
  encoder is trained through p(z|x) while the document encoder and the index stay fixed (§2.2, §3.1).
- ``frozen``: q(x) is frozen (no gradient, eval mode, not saved in checkpoints); only the generator learns.
- ``bm25``: BM25 over title + text; its scores are the document logits of p(z|x).
- ``none``: closed-book BART through the same code path: one input per question holding the question alone,
  doc_scores zeros (B, 1), so both heads reduce to the plain BART NLL.
- ``gold``: an oracle that reads each question's own gold passage (:class:`~rag.retrieval.retriever.GoldRetriever`,
  doc_scores zeros): the reader warm-up of the embedded reference model, and the "given the gold passage"
  upper bound of an evaluation. Not one of the paper's settings.

``freeze`` lists regular expressions over ``named_parameters()`` (e.g. ``generator\.model\.model\.shared``):
the parameters they match get ``requires_grad=False`` and stay out of the optimiser (the reference model
keeps the MiniLM embeddings and lower layers fixed, which also keeps its shipped delta small).

The retriever (index, stored document embeddings, passages) is a plain attribute, never a registered module
or parameter: it is not in ``state_dict()`` and never goes into a checkpoint; whoever loads a checkpoint
re-attaches it (``rag.build.build_model`` does, from the run's config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from rag.errors import RagError
from rag.generation.context import build_context_inputs, build_labels
from rag.generation.decoding import DECODERS, rag_generate
from rag.generation.generator import Generator
from rag.generation.marginalize import (
    rag_sequence_doc_posteriors,
    rag_sequence_nll,
    rag_token_doc_posteriors,
    rag_token_nll,
)
from rag.retrieval.encoders import BertEncoder, DocumentEncoder, QueryEncoder
from rag.retrieval.retriever import BM25Retriever, DenseRetriever, GoldRetriever, Retriever
from rag.types import Passage, Question, RetrievalOutput

__all__ = [
    "HEADS",
    "RETRIEVER_MODES",
    "RagAnswer",
    "RagModel",
    "RagModelError",
    "RagOutput",
    "tiny_bert_encoder",
]

Head = Literal["token", "sequence"]
RetrieverMode = Literal["learned", "frozen", "bm25", "none", "gold"]
HEADS: tuple[str, ...] = ("token", "sequence")
RETRIEVER_MODES: tuple[str, ...] = ("learned", "frozen", "bm25", "none", "gold")
REDUCTIONS: tuple[str, ...] = ("none", "sum", "mean", "token_mean")
#: the decoder each head uses unless one is named: the paper decodes RAG-Token greedily for QA and
#: RAG-Sequence with thorough decoding (§2.5, §4.1)
DEFAULT_DECODER = {"token": "token_greedy", "sequence": "sequence_thorough"}


@dataclass
class Explanation:
    """Which passage each part of an answer came from (the paper's Figure 2), for one question.

    ``tokens`` are the answer's generator tokens (as scored: BOS and EOS included); ``token_posteriors``
    (T, K) is RAG-Token's p(z_t | x, y_t, y_<t) per token, ``doc_posteriors`` (K,) RAG-Sequence's p(z | x, y)
    for the whole answer, ``doc_priors`` (K,) the retriever's p(z | x).
    """

    question: str
    answer: str
    tokens: list[str]
    passages: list[Passage]
    doc_priors: torch.Tensor  # (K,)
    doc_posteriors: torch.Tensor  # (K,)
    token_posteriors: torch.Tensor  # (T, K)


class RagModelError(RagError, ValueError):
    """A RagModel built or called with parts or options that do not fit together; the message says the fix."""


@dataclass
class RagOutput:
    """What one teacher-forced pass returns for B questions and K documents each (K = 1 closed book)."""

    loss: torch.Tensor  # () for reductions sum / mean / token_mean, (B,) for "none"
    seq_logits: torch.Tensor  # (B, K, T, V)
    doc_scores: torch.Tensor  # (B, K) retrieval logits (with gradient to q(x) in learned mode)
    labels: torch.Tensor  # (B, T) targets, padded with the generator's pad id
    retrieval: RetrievalOutput | None  # None closed book
    n_truncated: int = 0  # generator inputs whose passage was cut to fit max_context_length


@dataclass
class RagAnswer:
    """One generated answer with the passages it was generated from.

    ``passages`` are the K documents the generator read, in retrieval order (best first); ``doc_scores`` their
    retrieval logits, ``doc_priors`` p(z|x) = softmax(doc_scores) and ``doc_posteriors`` p(z|x,y) for the
    answer (see :class:`rag.generation.decoding.RagGenerationOutput`). Closed book: all four are empty.
    """

    question: str
    answer: str
    score: float  # log p(y|x) under the decoder's head
    passages: list[Passage] = field(default_factory=list)
    doc_scores: list[float] = field(default_factory=list)
    doc_priors: list[float] = field(default_factory=list)
    doc_posteriors: list[float] = field(default_factory=list)


def _retriever_mode(retriever: Retriever | None, mode: str | None, train_query_encoder: bool | None) -> str:
    """The retriever mode a model runs in: ``mode`` when given (checked), else read off the retriever."""
    if mode is None:
        if retriever is None:
            return "none"
        if isinstance(retriever, GoldRetriever):
            return "gold"
        if isinstance(retriever, BM25Retriever):
            return "bm25"
        if isinstance(retriever, DenseRetriever):
            return "frozen" if train_query_encoder is False else "learned"
        raise RagModelError(
            f"retriever must be a DenseRetriever, BM25Retriever, GoldRetriever or None, got {type(retriever).__name__}"
        )
    if mode not in RETRIEVER_MODES:
        raise RagModelError(f"retriever_mode must be one of {RETRIEVER_MODES}, got {mode!r}")
    if (
        train_query_encoder is not None
        and mode in ("learned", "frozen")
        and (mode == "learned") != train_query_encoder
    ):
        raise RagModelError(
            f"retriever_mode={mode!r} contradicts train_query_encoder={train_query_encoder}: give one of them"
        )
    return mode


def _question_texts(questions: Sequence[Question | str]) -> list[str]:
    if isinstance(questions, (str, Question)):
        raise RagModelError("pass a list of questions (one per batch element), not a single question")
    texts = [q.question if isinstance(q, Question) else q for q in questions]
    if not texts:
        raise RagModelError("no questions given: pass at least one question")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise RagModelError(f"question {i} is {text!r}: every question must be a non-empty string")
    return texts


class RagModel(nn.Module):
    """Query encoder + frozen retriever + generator + head; ``forward`` gives the loss, ``generate`` answers.

    Args:
        generator: the seq2seq generator p(y|x,z).
        query_encoder: q(x); required by the ``learned`` and ``frozen`` modes, ignored otherwise.
        retriever: a :class:`DenseRetriever`, :class:`BM25Retriever` or :class:`GoldRetriever`; None for a
            closed-book model. Held as a plain attribute (not a submodule): never in the state dict.
        head: ``token`` (RAG-Token) or ``sequence`` (RAG-Sequence) marginalisation of the training loss.
        train_query_encoder: with a dense retriever, whether q(x) is trained (``learned``, the paper) or kept
            frozen (``frozen``, Table 6); None: trained.
        retriever_mode: ``learned`` | ``frozen`` | ``bm25`` | ``gold`` | ``none`` (module docstring); None
            (the default): read off the retriever's type and ``train_query_encoder``. When given, the
            retriever must be of the kind it names.
        n_docs: K, documents per question in training (the paper: 5 or 10).
        eval_n_docs: K in ``generate`` and evaluation; None: ``n_docs``.
        max_context_length: Lc at most for ``title / text // question`` (the passage is cut, never the
            question).
        max_target_length: T at most for the target answer (cut, keeping eos).
        context_prefix: prepended to every generator input; None: the generator config's ``prefix``, as
            transformers' ``RagRetriever`` does (released RAG checkpoints are evaluated that way, see
            :mod:`rag.interop`).
        label_smoothing, label_smoothing_form, reduction, exclude_bos: passed to the head's NLL
            (:mod:`rag.generation.marginalize`); ``reduction`` is ``none`` | ``sum`` | ``mean`` |
            ``token_mean``.
        decoder: ``token_greedy`` | ``token_beam`` | ``sequence_thorough`` | ``sequence_fast``; None: the
            head's own (token: greedy, sequence: thorough).
        generation: default transformers generation settings for ``generate`` (``num_beams``,
            ``max_new_tokens``, ``min_length``, ``length_penalty``, ...).
        freeze: regular expressions (``re.search``) over parameter names; what they match is not trained.
            Each must match at least one parameter (a typo fails at once).
        doc_score_scale: dense retrieval logits are ``doc_score_scale * q(x)·d(z)`` (learned and frozen
            modes; BM25 scores are used as they are). 1 for DPR, whose unnormalised inner products are
            already sharp. An L2-normalised encoder (all-MiniLM-L6-v2) scores cosines in [-1, 1], and
            softmax over five cosines is nearly uniform: p(z|x) then cannot tell the passage that holds the
            answer from the others. A scale of 20 (a temperature of 0.05, sentence-transformers' default for
            the contrastive loss such encoders are trained with) gives the prior the sharpness DPR's has.
    """

    def __init__(
        self,
        generator: Generator,
        query_encoder: QueryEncoder | None = None,
        retriever: Retriever | None = None,
        *,
        head: Head = "token",
        retriever_mode: RetrieverMode | None = None,
        train_query_encoder: bool | None = None,
        n_docs: int = 5,
        eval_n_docs: int | None = None,
        max_context_length: int = 200,
        max_target_length: int = 32,
        context_prefix: str | None = "",
        label_smoothing: float = 0.0,
        label_smoothing_form: str = "posterior",
        reduction: str = "mean",
        exclude_bos: bool = False,
        decoder: str | None = None,
        generation: Mapping[str, Any] | None = None,
        freeze: Sequence[str] = (),
        doc_score_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise RagModelError(f"head must be one of {HEADS}, got {head!r}")
        retriever_mode = _retriever_mode(retriever, retriever_mode, train_query_encoder)
        if reduction not in REDUCTIONS:
            raise RagModelError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if decoder is not None and decoder not in DECODERS:
            raise RagModelError(
                f"decoder must be one of {DECODERS} or null (the head's own), got {decoder!r}"
            )
        if not isinstance(generator, Generator):
            raise RagModelError(
                f"generator must be a rag.generation.generator.Generator, got {type(generator).__name__}: build "
                "it with load_generator / bart_from_bert / build_tiny_bart"
            )
        self.generator = generator
        self.head = head
        self.retriever_mode = retriever_mode
        self._check_retriever(retriever, query_encoder)
        # a plain attribute: nn.Module.__setattr__ registers only Modules, Parameters and buffers
        self.retriever = retriever if retriever_mode != "none" else None
        self.query_encoder = query_encoder if retriever_mode in ("learned", "frozen") else None
        if retriever_mode == "frozen":
            self.query_encoder.requires_grad_(False)
            self.query_encoder.eval()
        self.n_docs = self._check_k(n_docs, "n_docs")
        self.eval_n_docs = None if eval_n_docs is None else self._check_k(eval_n_docs, "eval_n_docs")
        self.max_context_length = int(max_context_length)
        if context_prefix is None:
            context_prefix = getattr(generator.config, "prefix", None) or ""
        self.context_prefix = str(context_prefix)
        self.max_target_length = int(max_target_length)
        self.label_smoothing = float(label_smoothing)
        self.label_smoothing_form = label_smoothing_form
        self.reduction = reduction
        self.exclude_bos = bool(exclude_bos)
        self.decoder = decoder
        self.generation = dict(generation or {})
        self.freeze = self._freeze(freeze)
        try:
            self.doc_score_scale = float(doc_score_scale)
        except (TypeError, ValueError):
            self.doc_score_scale = float("nan")
        if not self.doc_score_scale > 0 or self.doc_score_scale == float("inf"):
            raise RagModelError(f"doc_score_scale must be a positive number, got {doc_score_scale!r}")

    # ------------------------------------------------------------------------------------ construction

    def _check_retriever(self, retriever: Retriever | None, query_encoder: QueryEncoder | None) -> None:
        mode = self.retriever_mode
        if mode in ("learned", "frozen"):
            if not isinstance(retriever, DenseRetriever):
                raise RagModelError(
                    f"retriever_mode={mode!r} needs a DenseRetriever (an index over stored document embeddings), "
                    f"got {type(retriever).__name__}: build one with DenseRetriever.from_directory, or use "
                    "retriever_mode=bm25 / none"
                )
            if not isinstance(query_encoder, BertEncoder) or isinstance(query_encoder, DocumentEncoder):
                raise RagModelError(
                    f"retriever_mode={mode!r} needs a trainable QueryEncoder, got {type(query_encoder).__name__}: "
                    "pass query_encoder=load_query_encoder(...)"
                )
            if query_encoder.dim != retriever.dim:
                raise RagModelError(
                    f"the query encoder {query_encoder.name!r} makes {query_encoder.dim}-d vectors but the index "
                    f"holds {retriever.dim}-d ones: use the query encoder paired with the index's document encoder"
                )
        elif mode == "gold" and not isinstance(retriever, GoldRetriever):
            raise RagModelError(
                f"retriever_mode='gold' needs a GoldRetriever, got {type(retriever).__name__}: build one with "
                "GoldRetriever.from_passages(passages)"
            )
        elif mode == "bm25" and not isinstance(retriever, BM25Retriever):
            raise RagModelError(
                f"retriever_mode='bm25' needs a BM25Retriever, got {type(retriever).__name__}: build one with "
                "BM25Retriever.from_passages(passages)"
            )

    def _freeze(self, patterns: Sequence[str]) -> list[str]:
        import re

        if isinstance(patterns, str):
            patterns = [patterns]
        names = [name for name, _ in self.named_parameters()]
        frozen = []
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise RagModelError(f"freeze pattern {pattern!r} is not a regular expression: {e}") from None
            hits = [p for name, p in self.named_parameters() if regex.search(name)]
            if not hits and pattern.lstrip("^").startswith("query_encoder") and self.query_encoder is None:
                continue  # one freeze list serves a model with and without a query encoder (closed book)
            if not hits:
                raise RagModelError(
                    f"freeze pattern {pattern!r} matches no parameter; names look like {names[0]!r}, {names[-1]!r}"
                )
            for p in hits:
                p.requires_grad_(False)
            frozen.append(pattern)
        return frozen

    def _check_k(self, k: int, name: str) -> int:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RagModelError(f"{name} must be a positive integer, got {k!r}")
        if self.retriever is not None and k > self.retriever.n_passages:
            raise RagModelError(
                f"{name}={k} but the corpus has only {self.retriever.n_passages} passages: use at most that many"
            )
        return k

    # ------------------------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def closed_book(self) -> bool:
        return self.retriever_mode == "none"

    @property
    def trains_query_encoder(self) -> bool:
        return self.retriever_mode == "learned"

    def default_decoder(self) -> str:
        return self.decoder or DEFAULT_DECODER[self.head]

    def train(self, mode: bool = True) -> RagModel:
        super().train(mode)
        if self.retriever_mode == "frozen":
            # a frozen retriever keeps dropout off, or p(z|x) would change between identical questions
            self.query_encoder.eval()
        return self

    # ------------------------------------------------------------------------------------ retrieval

    def embed_questions(self, texts: Sequence[str]) -> torch.Tensor:
        """q(x) for B question strings -> (B, D), with gradient in learned mode when grad is enabled."""
        batch = self.query_encoder.tokenize(texts)
        device = self.query_encoder.device
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_query_encoder):
            return self.query_encoder(**batch)  # (B, D)

    def retrieve(
        self, questions: Sequence[Question | str], n_docs: int | None = None
    ) -> RetrievalOutput | None:
        """The K = ``n_docs`` (default: training ``n_docs``) passages of each question, best first.

        Learned mode: ``doc_scores`` (B, K) carry the gradient to q(x); the index search itself sees a
        detached copy (done inside ``retrieve_by_embeds``). None in closed-book mode.
        """
        if self.closed_book:
            return None
        texts = _question_texts(questions)
        k = self._check_k(self.n_docs if n_docs is None else n_docs, "n_docs")
        if self.retriever_mode == "gold":
            if not all(isinstance(q, Question) for q in questions):
                raise RagModelError(
                    "retriever_mode='gold' reads each question's gold passage: pass rag.types.Question records"
                )
            out = self.retriever.retrieve(list(questions), k)
            out.doc_scores = out.doc_scores.to(device=self.device)  # (B, K) zeros: uniform p(z|x)
            return out
        if self.retriever_mode == "bm25":
            out = self.retriever.retrieve(texts, k)
            out.doc_scores = out.doc_scores.to(device=self.device, dtype=torch.float32)  # (B, K)
            return out
        question_embeds = self.embed_questions(texts)  # (B, D)
        out = self.retriever.retrieve_by_embeds(question_embeds, k)
        if self.doc_score_scale != 1.0:
            out.doc_scores = out.doc_scores * self.doc_score_scale  # (B, K), gradient kept
        return out

    # ------------------------------------------------------------------------------------ training

    def _context_inputs(self, texts: list[str], retrieval):
        """Generator inputs for the retrieved passages, or the question alone (closed book)."""
        return build_context_inputs(
            texts,
            None if retrieval is None else retrieval.passages,
            self.generator,
            n_docs=0 if retrieval is None else None,
            max_context_length=self.max_context_length,
            prefix=self.context_prefix,
        )

    def forward(
        self,
        questions: Sequence[Question | str],
        targets: Sequence[str],
        n_docs: int | None = None,
    ) -> RagOutput:
        """The head's marginal NLL of ``targets`` (one answer string per question) given ``questions``."""
        texts = _question_texts(questions)
        if isinstance(targets, str) or len(targets) != len(texts):
            raise RagModelError(
                f"got {len(texts)} questions but {1 if isinstance(targets, str) else len(targets)} targets: pass "
                "one target answer string per question"
            )
        retrieval = self.retrieve(questions, n_docs)
        ctx = self._context_inputs(texts, retrieval)
        device = self.device
        doc_scores = ctx.doc_scores.to(device) if retrieval is None else retrieval.doc_scores  # (B, K)
        labels = build_labels(list(targets), self.generator, self.max_target_length).to(device)  # (B, T)
        seq_logits = self.generator(
            ctx.context_input_ids.to(device), ctx.context_attention_mask.to(device), labels=labels
        )  # (B, K, T, V)
        nll = rag_token_nll if self.head == "token" else rag_sequence_nll
        kwargs = {"label_smoothing_form": self.label_smoothing_form} if self.head == "sequence" else {}
        loss = nll(
            seq_logits,
            doc_scores,
            labels,
            pad_token_id=self.generator.pad_token_id,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
            bos_token_id=self.generator.bos_token_id,
            exclude_bos=self.exclude_bos,
            **kwargs,
        )
        return RagOutput(
            loss=loss,
            seq_logits=seq_logits,
            doc_scores=doc_scores,
            labels=labels,
            retrieval=retrieval,
            n_truncated=ctx.n_truncated,
        )

    # ------------------------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        questions: Sequence[Question | str],
        *,
        n_docs: int | None = None,
        decoder: str | None = None,
        retrieval: RetrievalOutput | None = None,
        **generation_kwargs,
    ) -> list[RagAnswer]:
        """Answer B questions with the chosen decoder over K = ``n_docs`` retrieved passages each.

        Args:
            n_docs: test-time K; None: ``eval_n_docs`` (else ``n_docs``). Any K up to the corpus size works
                whatever K the model was trained with (the paper's Figure 3 sweep).
            decoder: ``token_greedy`` | ``token_beam`` | ``sequence_thorough`` | ``sequence_fast``; None: the
                model's default (``self.decoder``, else the head's own).
            retrieval: these questions' passages retrieved earlier (``retrieve`` with K >= ``n_docs``, best
                first): the first ``n_docs`` of each are read and the index is not searched again. One
                search at the largest K then serves a whole sweep over K, or a swapped index.
            **generation_kwargs: transformers generation settings, over ``self.generation``.
        """
        texts = _question_texts(questions)
        decoder = decoder or self.default_decoder()
        if decoder not in DECODERS:
            raise RagModelError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        k = n_docs if n_docs is not None else (self.eval_n_docs or self.n_docs)
        if retrieval is None:
            retrieval = self.retrieve(questions, k)
        elif self.closed_book:
            raise RagModelError("a closed-book model reads no passages: do not pass retrieval=")
        else:
            if len(retrieval.passages) != len(texts):
                raise RagModelError(
                    f"retrieval holds passages for {len(retrieval.passages)} questions but {len(texts)} "
                    "questions were given: pass the retrieval of exactly these questions"
                )
            if retrieval.n_docs < k:
                raise RagModelError(
                    f"retrieval holds {retrieval.n_docs} passages per question but n_docs={k} were asked: "
                    f"retrieve at least {k} first"
                )
            retrieval = retrieval.top(k)
        ctx = self._context_inputs(texts, retrieval)
        device = self.device
        doc_scores = (
            (ctx.doc_scores if retrieval is None else retrieval.doc_scores).to(device).float()
        )  # (B, K)
        settings = dict(self.generation)
        if decoder == "token_greedy":
            # a beam width set for the model's beam decoders does not apply to greedy decoding
            settings.pop("num_beams", None)
        settings.update(generation_kwargs)
        out = rag_generate(
            self.generator.model,
            ctx.context_input_ids.to(device),
            ctx.context_attention_mask.to(device),
            doc_scores,
            decoder=decoder,
            **settings,
        )
        answers = self.generator.tokenizer.batch_decode(out.sequences[:, 0], skip_special_tokens=True)
        priors = torch.softmax(doc_scores, dim=-1)  # (B, K)
        results = []
        for b, text in enumerate(texts):
            if retrieval is None:
                results.append(RagAnswer(text, answers[b].strip(), float(out.scores[b, 0])))
                continue
            # doc_indices are all K columns in input order here (no n_docs subset was asked of the decoder)
            columns = out.doc_indices[b].tolist()
            results.append(
                RagAnswer(
                    question=text,
                    answer=answers[b].strip(),
                    score=float(out.scores[b, 0]),
                    passages=[retrieval.passages[b][c] for c in columns],
                    doc_scores=[float(doc_scores[b, c]) for c in columns],
                    doc_priors=[float(priors[b, c]) for c in columns],
                    doc_posteriors=out.doc_posteriors[b, 0].tolist(),
                )
            )
        return results

    @torch.no_grad()
    def explain(
        self,
        questions: Sequence[Question | str],
        answers: Sequence[str],
        *,
        n_docs: int | None = None,
        retrieval: RetrievalOutput | None = None,
    ) -> list[Explanation]:
        """Document posteriors of given answers (e.g. the model's own): per token (RAG-Token, the paper's
        Figure 2) and per answer (RAG-Sequence), beside the retriever's priors. One teacher-forced pass."""
        if self.closed_book:
            raise RagModelError("a closed-book model reads no passages: there is nothing to explain")
        texts = _question_texts(questions)
        if isinstance(answers, str) or len(answers) != len(texts):
            raise RagModelError("pass one answer string per question")
        k = n_docs if n_docs is not None else (self.eval_n_docs or self.n_docs)
        if retrieval is None:
            retrieval = self.retrieve(questions, k)
        else:
            retrieval = retrieval.top(k)
        ctx = self._context_inputs(texts, retrieval)
        device = self.device
        labels = build_labels(list(answers), self.generator, self.max_target_length).to(device)  # (B, T)
        seq_logits = self.generator(
            ctx.context_input_ids.to(device), ctx.context_attention_mask.to(device), labels=labels
        )  # (B, K, T, V)
        doc_scores = retrieval.doc_scores.to(device).float()  # (B, K)
        kw = {"pad_token_id": self.generator.pad_token_id, "bos_token_id": self.generator.bos_token_id}
        per_token = rag_token_doc_posteriors(seq_logits, doc_scores, labels, **kw)  # (B, T, K)
        per_answer = rag_sequence_doc_posteriors(seq_logits, doc_scores, labels, **kw)  # (B, K)
        priors = torch.softmax(doc_scores, dim=-1)  # (B, K)
        out = []
        pad = self.generator.pad_token_id
        for b, text in enumerate(texts):
            keep = labels[b] != pad if pad is not None else torch.ones_like(labels[b], dtype=torch.bool)
            ids = labels[b][keep].tolist()
            out.append(
                Explanation(
                    question=text,
                    answer=answers[b],
                    tokens=self.generator.tokenizer.convert_ids_to_tokens(ids),
                    passages=list(retrieval.passages[b]),
                    doc_priors=priors[b].cpu(),
                    doc_posteriors=per_answer[b].cpu(),
                    token_posteriors=per_token[b][keep].cpu(),
                )
            )
        return out

    def extra_repr(self) -> str:
        retriever = (
            "none"
            if self.retriever is None
            else f"{type(self.retriever).__name__}({self.retriever.n_passages})"
        )
        return (
            f"head={self.head!r}, retriever_mode={self.retriever_mode!r}, retriever={retriever}, "
            f"n_docs={self.n_docs}, eval_n_docs={self.eval_n_docs}, decoder={self.default_decoder()!r}"
        )


def tiny_bert_encoder(
    kind: Literal["query", "document"] = "query",
    *,
    hidden_size: int = 32,
    layers: int = 2,
    attention_heads: int = 2,
    intermediate_size: int = 64,
    pooling: str = "mean",
    normalize: bool = False,
    max_length: int = 128,
    seed: int = 0,
    name: str = "tiny-bert",
    dropout: float = 0.1,
) -> BertEncoder:
    """A randomly initialised BERT encoder of a few layers (smoke runs, tests), a function of the seed alone.

    Uses the shipped MiniLM WordPiece tokenizer (always installed), so it needs no files and no hub. The query
    and document encoders of one seed start equal, as DPR's two encoders start from one BERT. ``dropout`` is
    BERT's hidden and attention dropout (0 makes a training step a function of its batch alone, so that runs
    over different numbers of processes can be compared).
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rag.generation.generator import default_bert_path

    if kind not in ("query", "document"):
        raise RagModelError(f"kind must be 'query' or 'document', got {kind!r}")
    tokenizer = AutoTokenizer.from_pretrained(default_bert_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max(512, max_length),
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False).eval()
    cls = QueryEncoder if kind == "query" else DocumentEncoder
    return cls(model, tokenizer, pooling=pooling, normalize=normalize, max_length=max_length, name=name)
