"""The four RAG decoders (paper §2.5), batched over questions and documents, honouring a test-time ``n_docs``.

* RAG-Token greedy and beam search: at every step the next-token distribution is the marginal
  log sum_z p(z|x) p(v|x,z,y_<t). Each (question, document) pair is encoded once; the decoder runs over all
  B * beams * K rows with a KV cache.
* RAG-Sequence "thorough": beam search per document (all B * K pairs in one batched search), the union of the
  hypotheses per question, every hypothesis rescored by forced decoding against all K documents (batched,
  reusing the encoder states), then marginalised: log p(y|x) = log sum_z p(z|x) p(y|x,z).
* RAG-Sequence "fast": the same without the rescoring passes; p(y|x,z) is taken from the beam of document z
  and is 0 when that beam did not produce y.

Every decoder returns, with each answer, its document posteriors p(z|x,y) (and for RAG-Token the per-token
posteriors of the paper's Figure 2) so users see which passage an answer came from.

The generator is any transformers encoder-decoder with a language-model head (BART, T5): the decoder start,
EOS, BOS and padding ids and the generation settings come from ``model.generation_config`` (then
``model.config``), overridable per call with the same names as ``transformers.GenerationConfig``.

The beam bookkeeping (top 2*beams continuations, finished-hypothesis pool, length penalty on the generated
length, the ``early_stopping`` heuristics) follows transformers' vectorised beam search, so that the same
settings give the same hypotheses as ``model.generate`` and transformers' RAG classes
(tests/test_parity_transformers.py). Where the results differ from transformers' RAG ``generate``, on purpose:

* RAG-Sequence candidates are searched with the contexts' attention mask; transformers passes
  ``attention_mask=None`` to the generator, so its beams attend to the padding of shorter contexts.
* A test-time ``n_docs`` is honoured in the rescoring too (transformers reshapes by ``config.n_docs``,
  huggingface/transformers#14394).
* A leading BOS is left out of each answer's score on its own; transformers leaves it out only when every
  candidate of the question starts with BOS.
* Settings default to the generator's ``generation_config``; transformers' RagTokenForGeneration reads the
  RAG model's own, which can differ from its generator's (pass settings explicitly to compare the two).

Speed: each (question, document) pair is encoded once, and its first decoder step and cross-attention
keys/values are computed once and shared by all its beams and rescored hypotheses; a rescored pair that a beam
already scored (the document produced that hypothesis) is not decoded again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import (
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    GenerationConfig,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
)
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from rag.errors import RagError
from rag.generation.marginalize import target_scored_mask

Decoder = Literal["token_greedy", "token_beam", "sequence_thorough", "sequence_fast"]
DECODERS: tuple[str, ...] = ("token_greedy", "token_beam", "sequence_thorough", "sequence_fast")

_NEG = -1.0e9  # "impossible" score used by transformers' beam search; kept identical so rankings match


class DecodingError(RagError, ValueError):
    """Bad inputs or settings for a RAG decoder."""


@dataclass
class RagGenerationOutput:
    """Answers for B questions, ``num_return_sequences`` = R each, over K' = ``n_docs`` documents.

    ``sequences`` start with the decoder start token and are padded with the generator's pad id after EOS.
    ``scores`` are log p(y|x) under the decoder's head, from the model's own (unprocessed) distributions,
    over the generated tokens (a leading BOS excluded when ``exclude_bos``); for "fast" decoding they are its
    approximation. ``doc_posteriors`` are p(z|x,y): for RAG-Sequence the posterior of the one document that
    generated the answer; for RAG-Token the mean over the answer's tokens of the per-token posteriors (the
    expected share of tokens drawn from each document). ``token_doc_posteriors`` (RAG-Token) are
    p(z_t|x,y) aligned with ``sequences`` (zero rows for the start token and padding). ``doc_indices`` say
    which of the K input documents the K' columns refer to.
    """

    sequences: torch.Tensor  # (B, R, T) int64
    scores: torch.Tensor  # (B, R)
    doc_posteriors: torch.Tensor  # (B, R, K')
    doc_indices: torch.Tensor  # (B, K') int64
    token_doc_posteriors: torch.Tensor | None = None  # (B, R, T, K')


# ----------------------------------------------------------------------------------------------- settings


_DEFAULTS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "max_length": 20,
    "min_length": 0,
    "length_penalty": 1.0,
    "early_stopping": False,
    "no_repeat_ngram_size": 0,
}
# settings that change transformers' output which these decoders do not implement: value that means "off"
_UNSUPPORTED = {
    "do_sample": False,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
    "constraints": None,
    "force_words_ids": None,
}


@dataclass(frozen=True)
class _Settings:
    num_beams: int
    num_return_sequences: int
    max_length: int  # counts the decoder start token, as in transformers
    min_length: int
    length_penalty: float
    early_stopping: bool | str
    no_repeat_ngram_size: int
    forced_bos_token_id: int | None
    forced_eos_token_id: int | list[int] | None
    decoder_start_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    bos_token_id: int | None


def _resolve_settings(
    model, generation_config: GenerationConfig | None, overrides: dict, decoder: str
) -> _Settings:
    if not getattr(model.config, "is_encoder_decoder", False) or not hasattr(model, "get_encoder"):
        raise DecodingError(
            f"{type(model).__name__} is not an encoder-decoder generator; RAG decoding needs a seq2seq model with a "
            "language-model head such as BartForConditionalGeneration or T5ForConditionalGeneration"
        )
    base = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    overrides = dict(overrides)
    # RAG-Sequence may return several answers from a greedy search per document, which a GenerationConfig
    # refuses to validate, so this one setting is kept aside
    num_return = overrides.pop("num_return_sequences", None)
    try:
        unknown = config.update(**overrides)
    except ValueError as error:
        raise DecodingError(f"invalid generation settings for {decoder}: {error}") from None
    if unknown:
        raise DecodingError(
            f"unknown generation setting(s) {sorted(unknown)} for {decoder}; use transformers.GenerationConfig names "
            "(num_beams, max_length, max_new_tokens, min_length, length_penalty, early_stopping, ...)"
        )
    for name, off in _UNSUPPORTED.items():
        value = getattr(config, name, None)
        if value is not None and value != off:
            raise DecodingError(
                f"generation setting {name}={value!r} is not supported by the RAG decoders; unset it (RAG decoding is "
                "deterministic greedy/beam search) or pass an equivalent transformers LogitsProcessor via logits_processor="
            )

    def get(name):
        value = getattr(config, name, None)
        return _DEFAULTS[name] if value is None else value

    def token(name):
        value = getattr(config, name, None)
        return getattr(model.config, name, None) if value is None else value

    max_new = getattr(config, "max_new_tokens", None)
    max_length = 1 + max_new if max_new is not None else get("max_length")
    eos = token("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [] if eos is None else [eos]))
    start = token("decoder_start_token_id")
    pad = token("pad_token_id")
    if start is None or pad is None or not eos_ids:
        raise DecodingError(
            "the generator config must define decoder_start_token_id, eos_token_id and pad_token_id "
            f"(got {start}, {eos}, {pad}); set them on model.config or model.generation_config"
        )
    settings = _Settings(
        num_beams=int(get("num_beams")),
        num_return_sequences=int(num_return if num_return is not None else get("num_return_sequences")),
        max_length=int(max_length),
        min_length=int(get("min_length")),
        length_penalty=float(get("length_penalty")),
        early_stopping=get("early_stopping"),
        no_repeat_ngram_size=int(get("no_repeat_ngram_size")),
        forced_bos_token_id=getattr(config, "forced_bos_token_id", None),
        forced_eos_token_id=getattr(config, "forced_eos_token_id", None),
        decoder_start_token_id=int(start),
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
        bos_token_id=token("bos_token_id"),
    )
    if settings.num_beams < 1 or settings.num_return_sequences < 1 or settings.max_length < 2:
        raise DecodingError(
            f"need num_beams >= 1, num_return_sequences >= 1 and max_length >= 2 (got {settings.num_beams}, "
            f"{settings.num_return_sequences}, {settings.max_length})"
        )
    return settings


def _logits_processors(s: _Settings, extra: LogitsProcessorList | None, device) -> LogitsProcessorList:
    # same processors, in the same order, as transformers builds from a generation config
    processors = LogitsProcessorList()
    if s.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(s.no_repeat_ngram_size))
    if s.min_length > 0:
        processors.append(MinLengthLogitsProcessor(s.min_length, list(s.eos_token_ids), device=device))
    if s.forced_bos_token_id is not None:
        processors.append(ForcedBOSTokenLogitsProcessor(s.forced_bos_token_id))
    if s.forced_eos_token_id is not None:
        processors.append(ForcedEOSTokenLogitsProcessor(s.max_length, s.forced_eos_token_id, device=device))
    processors.extend(extra or [])
    return processors


# ----------------------------------------------------------------------------------------------- inputs


def _select_docs(
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor,
    doc_scores: torch.Tensor,
    n_docs: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``n_docs`` best-scored documents of each question, in their input order."""
    if context_input_ids.dim() != 3:
        raise DecodingError(
            f"context_input_ids must have shape (B, K, Lc), got {tuple(context_input_ids.shape)}; "
            "reshape flattened (B*K, Lc) inputs with .view(B, K, Lc)"
        )
    b, k, lc = context_input_ids.shape
    if tuple(context_attention_mask.shape) != (b, k, lc):
        raise DecodingError(
            f"context_attention_mask has shape {tuple(context_attention_mask.shape)}, expected {(b, k, lc)} "
            "like context_input_ids"
        )
    if tuple(doc_scores.shape) != (b, k):
        raise DecodingError(f"doc_scores has shape {tuple(doc_scores.shape)}, expected (B, K) = {(b, k)}")
    n_docs = k if n_docs is None else n_docs
    if not 1 <= n_docs <= k:
        raise DecodingError(
            f"n_docs={n_docs} but the inputs carry K={k} documents per question; ask for 1..{k} or retrieve more"
        )
    if n_docs == k:
        doc_indices = torch.arange(k, device=doc_scores.device).expand(b, k)
    else:
        doc_indices = doc_scores.topk(n_docs, dim=1).indices.sort(dim=1).values  # (B, n)
    ids = context_input_ids.gather(1, doc_indices[..., None].expand(-1, -1, lc))  # (B, n, Lc)
    mask = context_attention_mask.gather(1, doc_indices[..., None].expand(-1, -1, lc))  # (B, n, Lc)
    return ids, mask, doc_scores.gather(1, doc_indices), doc_indices


class _EncodedContexts:
    """The generator's encoder run once over the N (question, document) rows, and the decoder's first step
    (the start token) with its cross-attention keys/values, also computed once where the generator's cache
    exposes them.

    Every beam and every rescored hypothesis of a row attends to the same encoder states and starts from the
    same first step; transformers recomputes both for each copy, here they are gathered instead.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, start_token: int):
        self.model = model
        encoder = model.get_encoder()
        self.hidden = encoder(
            input_ids=input_ids, attention_mask=attention_mask, return_dict=True
        ).last_hidden_state  # (N, Lc, H)
        self.mask = attention_mask  # (N, Lc)
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=self.hidden),
            attention_mask=attention_mask,
            decoder_input_ids=torch.full((input_ids.shape[0], 1), start_token, device=input_ids.device),
            use_cache=True,
            return_dict=True,
        )
        cache = out.past_key_values
        self.first_logits = out.logits[:, -1].float()  # (N, V)
        # per decoder layer (keys, values): self-attention of the start token (N, heads, 1, head_dim) and
        # cross-attention (N, heads, Lc, head_dim); None when the cache is of another kind
        self.first_self = self.cross = self._first_cache = None
        if isinstance(cache, EncoderDecoderCache) and all(cache.is_updated.values()):
            self.first_self = [(layer.keys, layer.values) for layer in cache.self_attention_cache.layers]
            self.cross = [(layer.keys, layer.values) for layer in cache.cross_attention_cache.layers]
            self._first_cache = cache  # handed, uncopied, to one decoder that continues every row in order

    def rows(self, index: torch.Tensor, after_first_step: bool):
        """Encoder outputs and mask of rows ``index``, and a decoder cache of their own holding their
        cross-attention (and the start token's self-attention if ``after_first_step``), or None."""
        cache = None
        n_rows = self.mask.shape[0]
        if index.shape[0] == n_rows and torch.equal(index, torch.arange(n_rows, device=index.device)):
            index = None  # every row once, in order: no copies
        if index is None and after_first_step and self._first_cache is not None:
            # cache updates replace tensors rather than writing into them, so first_self and cross stay intact
            cache, self._first_cache = self._first_cache, None
        elif self.cross is not None:

            def select(layers):
                if index is None:
                    return list(layers)
                return [(k.index_select(0, index), v.index_select(0, index)) for k, v in layers]

            own = DynamicCache(select(self.first_self)) if after_first_step else DynamicCache()
            cache = EncoderDecoderCache(own, DynamicCache(select(self.cross)))
        if index is None:
            return BaseModelOutput(last_hidden_state=self.hidden), self.mask, cache
        hidden = BaseModelOutput(last_hidden_state=self.hidden.index_select(0, index))  # (R, Lc, H)
        return hidden, self.mask.index_select(0, index), cache


def _reorder_self_attention(cache, index: torch.Tensor):
    # cross-attention keys/values depend only on the (question, document) encoder states, which every beam of a
    # row group shares, so reordering beams leaves them unchanged: only the self-attention cache moves
    if isinstance(cache, EncoderDecoderCache):
        cache.self_attention_cache.reorder_cache(index)
        return cache
    if isinstance(cache, tuple):  # legacy per-layer tuples (self k, self v, cross k, cross v)
        return tuple(
            (layer[0].index_select(0, index), layer[1].index_select(0, index), *layer[2:]) for layer in cache
        )
    cache.reorder_cache(index)
    return cache


class _CachedDecoder:
    """Runs the decoder one token at a time for rows ``index`` of the encoded contexts, with a KV cache."""

    def __init__(self, contexts: _EncodedContexts, index: torch.Tensor):
        self.model = contexts.model
        self.encoder_outputs, self.encoder_mask, self.cache = contexts.rows(index, after_first_step=True)
        # the start token's step is already done when the cache came prefilled with it
        self.first_logits = None if self.cache is None else contexts.first_logits[index]

    def __call__(self, last_tokens: torch.Tensor, reorder: torch.Tensor | None) -> torch.Tensor:
        if self.first_logits is not None:
            logits, self.first_logits = self.first_logits, None
            return logits  # (N, V)
        if reorder is not None and self.cache is not None:
            self.cache = _reorder_self_attention(self.cache, reorder)
        out = self.model(
            encoder_outputs=self.encoder_outputs,
            attention_mask=self.encoder_mask,
            decoder_input_ids=last_tokens[:, None],  # (N, 1)
            past_key_values=self.cache,
            use_cache=True,
            return_dict=True,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1].float()  # (N, V)


# ----------------------------------------------------------------------------------------------- searches

# A step maps the running prefixes (N, t) and the beam reordering chosen at the previous step to
#   logits: what transformers' model forward returns for the next token (N, V): raw logits for a plain
#           generator, marginal log-probabilities for RAG-Token;
#   payload: a function of (rows (M,), tokens (M,)) giving (M, P) values to carry along each hypothesis that
#           extends row with token (the model's own log-probabilities), gathered only for chosen candidates.
Payload = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, Payload]]


def _greedy(step: Step, n_rows: int, s: _Settings, processors, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy search: (N, T) sequences and (N, T, P) payloads (position 0 is the start token)."""
    sequences = torch.full((n_rows, 1), s.decoder_start_token_id, dtype=torch.long, device=device)
    payloads = []
    eos = torch.tensor(s.eos_token_ids, device=device)
    unfinished = torch.ones(n_rows, dtype=torch.bool, device=device)
    while True:
        logits, payload = step(sequences, None)
        next_tokens = processors(sequences, logits).argmax(-1)  # (N,)
        next_tokens = torch.where(unfinished, next_tokens, s.pad_token_id)
        chosen = payload(torch.arange(n_rows, device=device), next_tokens)  # (N, P)
        payloads.append(chosen.masked_fill(~unfinished[:, None], 0.0))
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)  # (N, t+1)
        unfinished &= ~torch.isin(next_tokens, eos)
        if sequences.shape[1] >= s.max_length or not unfinished.any():
            break
    payload_out = torch.stack(payloads, dim=1)  # (N, T-1, P)
    payload_out = torch.cat([torch.zeros_like(payload_out[:, :1]), payload_out], dim=1)  # (N, T, P)
    return sequences, payload_out


def _beam_search(
    step: Step, batch_size: int, s: _Settings, processors, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Beam search over ``batch_size`` independent items with ``s.num_beams`` beams each.

    Returns the finished hypotheses sorted best first: sequences (B, beams, T), length-normalised processed
    scores (B, beams) and payloads (B, beams, T, P).
    """
    num_beams, max_length, lp = s.num_beams, s.max_length, s.length_penalty
    eos = torch.tensor(s.eos_token_ids, device=device)
    beams_to_keep = max(2, 1 + len(s.eos_token_ids)) * num_beams
    # only the top `num_beams` continuations may finish a hypothesis; the rest keep enough beams running
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams
    batch_range = torch.arange(batch_size, device=device)

    running = torch.full((batch_size, num_beams, max_length), s.pad_token_id, dtype=torch.long, device=device)
    running[:, :, 0] = s.decoder_start_token_id
    finished = running.clone()
    running_scores = torch.zeros(batch_size, num_beams, device=device)
    running_scores[:, 1:] = _NEG  # only beam 0 expands at the first step: no duplicate beams
    finished_scores = torch.full((batch_size, num_beams), _NEG, device=device)
    is_finished = torch.zeros(batch_size, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
    running_payload = finished_payload = None
    reorder = None
    cur_len = 1
    while True:
        flat = running[:, :, :cur_len].reshape(batch_size * num_beams, cur_len)
        logits, payload = step(flat, reorder)
        log_probs = processors(flat, torch.log_softmax(logits, dim=-1))  # (B*beams, V)
        vocab = log_probs.shape[-1]
        accumulated = (log_probs.view(batch_size, num_beams, vocab) + running_scores[:, :, None]).view(
            batch_size, -1
        )
        topk_scores, topk_index = accumulated.topk(beams_to_keep, dim=1)  # (B, C)
        source_beam = topk_index // vocab  # (B, C)
        tokens = topk_index % vocab  # (B, C)
        cand = running.take_along_dim(source_beam[..., None], dim=1)  # (B, C, T)
        cand[:, :, cur_len] = tokens
        chosen = payload(
            (source_beam + batch_range[:, None] * num_beams).view(-1), tokens.view(-1)
        )  # (B*C, P)
        if running_payload is None:
            shape = (batch_size, num_beams, max_length, chosen.shape[-1])
            running_payload = torch.zeros(shape, dtype=chosen.dtype, device=device)
            finished_payload = running_payload.clone()
        cand_payload = running_payload.take_along_dim(source_beam[..., None, None], dim=1)  # (B, C, T, P)
        cand_payload[:, :, cur_len] = chosen.view(batch_size, beams_to_keep, -1)
        hits_stop = torch.isin(tokens, eos) | (cur_len + 1 >= max_length)  # (B, C)

        # beams that keep running: best non-finished continuations
        running_candidates = topk_scores + hits_stop.to(torch.float32) * _NEG
        keep = running_candidates.topk(num_beams, dim=1).indices  # (B, beams)
        running = cand.take_along_dim(keep[..., None], dim=1)
        running_scores = running_candidates.take_along_dim(keep, dim=1)
        running_payload = cand_payload.take_along_dim(keep[..., None, None], dim=1)
        running_source = source_beam.take_along_dim(keep, dim=1)  # (B, beams)

        # hypotheses that just finished join the pool if they beat its worst member
        just_finished = hits_stop & top_num_beam_mask[None, :]
        # the length penalty counts generated tokens: the start token out, the new token in
        normalised = topk_scores / (cur_len**lp)
        pool_closed = is_finished.all(dim=-1, keepdim=True) & (s.early_stopping is True)
        normalised = normalised + pool_closed.to(torch.float32) * _NEG
        normalised = normalised + (~can_improve).to(torch.float32) * _NEG
        normalised = normalised + (~just_finished) * _NEG
        merged_scores = torch.cat([finished_scores, normalised], dim=1)
        best = merged_scores.topk(num_beams, dim=1).indices  # (B, beams)
        finished = torch.cat([finished, cand], dim=1).take_along_dim(best[..., None], dim=1)
        finished_scores = merged_scores.take_along_dim(best, dim=1)
        finished_payload = torch.cat([finished_payload, cand_payload], dim=1).take_along_dim(
            best[..., None, None], 1
        )
        is_finished = torch.cat([is_finished, just_finished], dim=1).take_along_dim(best, dim=1)

        reorder = (running_source + batch_range[:, None] * num_beams).view(-1)  # (B*beams,)
        cur_len += 1
        if s.early_stopping == "never" and lp > 0.0:
            best_length = max_length - 1
        else:
            best_length = cur_len - 1
        best_running = running_scores[:, :1] / (best_length**lp)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        open_pool = not (bool(is_finished.all()) and s.early_stopping is True)
        if not (bool(can_improve.any()) and open_pool and not bool(hits_stop.all())):
            break
    return finished, finished_scores, finished_payload


# ----------------------------------------------------------------------------------------------- helpers


def _generated_mask(sequences: torch.Tensor, s: _Settings, exclude_bos: bool) -> torch.Tensor:
    """Positions of ``sequences`` (..., T) that count as generated answer tokens (start token excluded)."""
    shape = sequences.shape
    target = sequences.reshape(-1, shape[-1])[:, 1:]
    mask = target_scored_mask(
        target, pad_token_id=s.pad_token_id, bos_token_id=s.bos_token_id, exclude_bos=exclude_bos
    )
    return mask.view(*shape[:-1], shape[-1] - 1)  # (..., T-1)


def _crop(sequences: torch.Tensor, pad_token_id: int) -> int:
    """Length that keeps every non-padding token after the start token."""
    body = sequences[..., 1:].reshape(-1, sequences.shape[-1] - 1) != pad_token_id
    if not body.any():
        return 1
    return int(body.any(0).nonzero().max()) + 2


def _check_n_return(s: _Settings, available: int, what: str) -> None:
    if s.num_return_sequences > available:
        raise DecodingError(
            f"num_return_sequences={s.num_return_sequences} exceeds the {available} hypotheses {what} keeps; "
            "raise num_beams or ask for fewer sequences"
        )


# ----------------------------------------------------------------------------------------------- RAG-Token


@torch.no_grad()
def rag_token_generate(
    model,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    n_docs: int | None = None,
    exclude_bos: bool = True,
    logits_processor: LogitsProcessorList | None = None,
    generation_config: GenerationConfig | None = None,
    **generation_kwargs,
) -> RagGenerationOutput:
    """RAG-Token decoding: greedy (``num_beams=1``) or beam search over the per-step marginal.

    Args:
        model: the generator (a transformers seq2seq LM).
        context_input_ids: (B, K, Lc) passage + question ids for every retrieved document.
        context_attention_mask: (B, K, Lc).
        doc_scores: (B, K) retrieval logits.
        n_docs: use only the n_docs best-scored documents of each question (default all K).
        exclude_bos: leave a leading BOS (forced by BART's generation config) out of ``scores`` and posteriors.
        logits_processor: extra transformers logits processors, applied after the configured ones.
        generation_config, **generation_kwargs: transformers generation settings (num_beams, max_length,
            max_new_tokens, min_length, length_penalty, early_stopping, no_repeat_ngram_size,
            forced_bos_token_id, forced_eos_token_id, num_return_sequences).
    """
    s = _resolve_settings(model, generation_config, generation_kwargs, "RAG-Token decoding")
    _check_n_return(s, s.num_beams, "RAG-Token search with this num_beams")
    ids, mask, scores, doc_indices = _select_docs(
        context_input_ids, context_attention_mask, doc_scores, n_docs
    )
    b, n, lc = ids.shape
    device = ids.device
    doc_logprobs = torch.log_softmax(scores.float(), dim=-1)  # (B, n)
    contexts = _EncodedContexts(model, ids.view(b * n, lc), mask.view(b * n, lc), s.decoder_start_token_id)
    beams = s.num_beams
    # rows are ordered (question, beam, document) so that a beam's K documents sit next to each other
    row_index = (
        torch.arange(b * n, device=device).view(b, 1, n).expand(-1, beams, -1).reshape(-1)
    )  # (B*beams*n,)
    decoder = _CachedDecoder(contexts, row_index)
    row_doc_logprobs = doc_logprobs.repeat_interleave(beams, dim=0)[..., None]  # (B*beams, n, 1)
    doc_range = torch.arange(n, device=device)

    def step(prefixes: torch.Tensor, reorder: torch.Tensor | None):
        row_reorder = None if reorder is None else (reorder[:, None] * n + doc_range).view(-1)
        logits = decoder(prefixes[:, -1].repeat_interleave(n), row_reorder)  # (B*beams*n, V)
        per_doc = torch.log_softmax(logits, dim=-1).view(-1, n, logits.shape[-1])  # (B*beams, n, V)
        marginal = torch.logsumexp(per_doc + row_doc_logprobs, dim=1)  # (B*beams, V)

        def payload(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return torch.cat([marginal[rows, tokens][:, None], per_doc[rows, :, tokens]], dim=1)  # (M, 1+n)

        return marginal, payload

    processors = _logits_processors(s, logits_processor, device)
    if beams == 1:
        sequences, payload = _greedy(step, b, s, processors, device)
        sequences, payload = sequences[:, None], payload[:, None]  # (B, 1, T), (B, 1, T, 1+n)
    else:
        sequences, _, payload = _beam_search(step, b, s, processors, device)
        sequences = sequences[:, : s.num_return_sequences]  # (B, R, T)
        payload = payload[:, : s.num_return_sequences]  # (B, R, T, 1+n)
    length = _crop(sequences, s.pad_token_id)
    sequences, payload = sequences[..., :length], payload[:, :, :length]

    scored = _generated_mask(sequences, s, exclude_bos)  # (B, R, T-1)
    marginal_ll = payload[:, :, 1:, 0].masked_fill(~scored, 0.0)  # (B, R, T-1)
    per_doc_ll = payload[:, :, 1:, 1:]  # (B, R, T-1, n)
    token_post = torch.softmax(doc_logprobs[:, None, None, :] + per_doc_ll, dim=-1)  # (B, R, T-1, n)
    token_post = token_post.masked_fill(~scored[..., None], 0.0)
    count = scored.sum(-1, keepdim=True)  # (B, R, 1)
    prior = doc_logprobs.exp()[:, None, :].expand(-1, sequences.shape[1], -1)  # (B, R, n)
    doc_post = torch.where(count > 0, token_post.sum(2) / count.clamp(min=1), prior)  # (B, R, n)
    token_doc_posteriors = torch.cat(
        [torch.zeros_like(token_post[:, :, :1]), token_post], dim=2
    )  # (B, R, T, n)
    return RagGenerationOutput(
        sequences=sequences,
        scores=marginal_ll.sum(-1),
        doc_posteriors=doc_post,
        doc_indices=doc_indices,
        token_doc_posteriors=token_doc_posteriors,
    )


# ----------------------------------------------------------------------------------------------- RAG-Sequence


def _rescore(
    contexts: _EncodedContexts,
    candidates: torch.Tensor,
    candidate_question: torch.Tensor,
    known: torch.Tensor,
    s: _Settings,
    exclude_bos: bool,
    batch_rows: int,
) -> torch.Tensor:
    """log p(y_c|x,z) for every candidate c against every document z of its question, by forced decoding.

    candidates (C, T) start with the decoder start token; rows of the encoded contexts are question * n + doc.
    ``known`` (C, n) holds the values the beams already computed (the document that produced a candidate
    scored it token by token) and NaN elsewhere; only the NaN pairs are decoded. Returns (C, n).
    """
    n, device = known.shape[1], candidates.device
    target = candidates[:, 1:]  # (C, T-1)
    scored = target_scored_mask(
        target, pad_token_id=s.pad_token_id, bos_token_id=s.bos_token_id, exclude_bos=exclude_bos
    )
    positions = torch.arange(target.shape[1], device=device)
    needed = (scored * (positions + 1)).amax(-1).clamp(min=1)  # (C,) decoder positions worth computing
    row_candidate, row_slot = known.isnan().nonzero(as_tuple=True)  # (P,), (P,)
    # rows sorted by answer length: each chunk runs only as far as its longest answer
    by_length = needed[row_candidate].argsort(stable=True)
    row_candidate, row_slot = row_candidate[by_length], row_slot[by_length]
    out = known.clone()
    for start in range(0, row_candidate.shape[0], batch_rows):
        cand, slot = row_candidate[start : start + batch_rows], row_slot[start : start + batch_rows]
        t = int(needed[cand].max())
        doc = candidate_question[cand] * n + slot
        encoder_outputs, encoder_mask, cache = contexts.rows(doc, after_first_step=True)
        token_ll = []
        if cache is not None:  # the start token's step is shared: its distribution is already known
            first = contexts.first_logits[doc]  # (rows, V)
            token_ll.append(
                first.gather(-1, target[cand, :1]) - first.logsumexp(-1, keepdim=True)
            )  # (rows, 1)
            decoder_input_ids = candidates[cand, 1:t]
        else:
            decoder_input_ids = candidates[cand, :t]
        if decoder_input_ids.shape[1] > 0:
            logits = contexts.model(
                encoder_outputs=encoder_outputs,
                attention_mask=encoder_mask,
                decoder_input_ids=decoder_input_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                return_dict=True,
            ).logits.float()  # (rows, t or t-1, V)
            step_target = target[cand, t - logits.shape[1] : t, None]
            token_ll.append(logits.gather(-1, step_target).squeeze(-1) - logits.logsumexp(-1))
        out[cand, slot] = torch.cat(token_ll, dim=1).masked_fill(~scored[cand, :t], 0.0).sum(-1)  # (rows,)
    return out


@torch.no_grad()
def rag_sequence_generate(
    model,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    n_docs: int | None = None,
    fast: bool = False,
    exclude_bos: bool = True,
    rescore_batch_rows: int = 256,
    logits_processor: LogitsProcessorList | None = None,
    generation_config: GenerationConfig | None = None,
    **generation_kwargs,
) -> RagGenerationOutput:
    """RAG-Sequence decoding, "thorough" (default) or ``fast=True``.

    Beam search runs for every (question, document) pair at once (greedy when ``num_beams=1``); the distinct
    hypotheses of each question are scored by log p(y|x) = log sum_z p(z|x) p(y|x,z), where p(y|x,z) comes from
    forced decoding against every document (thorough) or from the beam of document z, and is 0 when that beam
    did not produce y (fast). The best ``num_return_sequences`` per question are returned, best first; a
    question with fewer distinct hypotheses gets padding rows with score -inf.

    Args are those of :func:`rag_token_generate`, plus ``fast`` and ``rescore_batch_rows`` (rows per forced
    decoding pass, to bound memory). ``exclude_bos`` also leaves a leading BOS out of the ranking score, as
    transformers' ``RagSequenceForGeneration.generate`` does.
    """
    s = _resolve_settings(model, generation_config, generation_kwargs, "RAG-Sequence decoding")
    ids, mask, scores, doc_indices = _select_docs(
        context_input_ids, context_attention_mask, doc_scores, n_docs
    )
    b, n, lc = ids.shape
    _check_n_return(
        s, n * s.num_beams, f"RAG-Sequence decoding over n_docs={n} documents with this num_beams"
    )
    device = ids.device
    doc_logprobs = torch.log_softmax(scores.float(), dim=-1)  # (B, n)
    contexts = _EncodedContexts(model, ids.view(b * n, lc), mask.view(b * n, lc), s.decoder_start_token_id)
    beams = s.num_beams
    decoder = _CachedDecoder(
        contexts, torch.arange(b * n, device=device).repeat_interleave(beams)
    )  # (b, doc, beam)

    def step(prefixes: torch.Tensor, reorder: torch.Tensor | None):
        logits = decoder(prefixes[:, -1], reorder)  # (B*n*beams, V)
        normaliser = logits.logsumexp(dim=-1)  # (N,)
        return logits, lambda rows, tokens: (logits[rows, tokens] - normaliser[rows])[:, None]  # (M, 1)

    processors = _logits_processors(s, logits_processor, device)
    if beams == 1:
        hyps, payload = _greedy(step, b * n, s, processors, device)
        hyps, payload = hyps[:, None], payload[:, None]  # (B*n, 1, T), (B*n, 1, T, 1)
        valid = torch.ones(b * n, 1, dtype=torch.bool, device=device)
    else:
        hyps, beam_scores, payload = _beam_search(step, b * n, s, processors, device)
        valid = beam_scores > _NEG / 2  # (B*n, beams)
    length = _crop(hyps, s.pad_token_id)
    hyps, payload = hyps[..., :length], payload[:, :, :length]
    own_ll = (
        payload[:, :, 1:, 0].masked_fill(~_generated_mask(hyps, s, exclude_bos), 0.0).sum(-1)
    )  # (B*n, beams)

    # union of the hypotheses of each question, in order of first appearance (document, then beam rank)
    per_q = n * hyps.shape[1]
    flat_hyps = hyps.reshape(b * per_q, length)  # (M, T)
    hyp_question = torch.arange(b, device=device).repeat_interleave(per_q)  # (M,)
    hyp_doc = torch.arange(n, device=device).repeat_interleave(hyps.shape[1]).repeat(b)  # (M,)
    keep = valid.reshape(-1)
    flat_hyps, hyp_question, hyp_doc, hyp_ll = (
        flat_hyps[keep],
        hyp_question[keep],
        hyp_doc[keep],
        own_ll.view(-1)[keep],
    )
    keys = torch.cat([hyp_question[:, None], flat_hyps], dim=1)  # (M, 1+T)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    m = keys.shape[0]
    first = torch.full((unique.shape[0],), m, device=device, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(m, device=device), reduce="amin")
    order = first.argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=device)
    candidates = unique[order, 1:]  # (C, T)
    candidate_question = unique[order, 0]  # (C,)
    hyp_candidate = rank[inverse]  # (M,)

    # log p(y|x,z) of each candidate under the documents whose beams produced it, NaN under the others
    known = torch.full((candidates.shape[0], n), float("nan"), device=device)
    known[hyp_candidate, hyp_doc] = hyp_ll  # (C, n)
    if fast:
        doc_ll = known.masked_fill(
            known.isnan(), float("-inf")
        )  # p(y|x,z) = 0 where z's beam did not produce y
    else:
        doc_ll = _rescore(contexts, candidates, candidate_question, known, s, exclude_bos, rescore_batch_rows)
    joint = doc_logprobs[candidate_question] + doc_ll  # (C, n)
    candidate_scores = torch.logsumexp(joint, dim=-1)  # (C,)
    candidate_post = torch.softmax(joint, dim=-1)  # (C, n)

    # best R per question: lay the candidates out as (B, Cmax)
    counts = torch.bincount(candidate_question, minlength=b)  # (B,)
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(candidates.shape[0], device=device) - offsets[candidate_question]  # (C,)
    width = max(int(counts.max()), s.num_return_sequences)
    dense_scores = torch.full((b, width), float("-inf"), device=device)
    dense_scores[candidate_question, slot] = candidate_scores
    dense_index = torch.full((b, width), -1, dtype=torch.long, device=device)
    dense_index[candidate_question, slot] = torch.arange(candidates.shape[0], device=device)
    top_scores, top = dense_scores.topk(s.num_return_sequences, dim=1)  # (B, R)
    chosen = dense_index.gather(1, top)  # (B, R), -1 where a question ran out of hypotheses
    present = chosen >= 0
    safe = chosen.clamp(min=0)
    sequences = candidates[safe].masked_fill(~present[..., None], s.pad_token_id)  # (B, R, T)
    sequences[..., 0] = s.decoder_start_token_id
    doc_post = candidate_post[safe].masked_fill(~present[..., None], 0.0)  # (B, R, n)
    length = _crop(sequences, s.pad_token_id)
    return RagGenerationOutput(
        sequences=sequences[..., :length],
        scores=top_scores,
        doc_posteriors=doc_post,
        doc_indices=doc_indices,
    )


def rag_generate(
    model,
    context_input_ids: torch.Tensor,
    context_attention_mask: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    decoder: Decoder = "sequence_thorough",
    **kwargs,
) -> RagGenerationOutput:
    """One entry point for the four decoders, named as in configs: ``token_greedy``, ``token_beam``,
    ``sequence_thorough``, ``sequence_fast``. Other arguments go to the decoder function."""
    if decoder not in DECODERS:
        raise DecodingError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "token_greedy":
        if kwargs.get("num_beams", 1) != 1:
            raise DecodingError(
                "token_greedy decodes with num_beams=1; use decoder='token_beam' for beam search"
            )
        kwargs["num_beams"] = 1
    if decoder.startswith("token"):
        return rag_token_generate(model, context_input_ids, context_attention_mask, doc_scores, **kwargs)
    return rag_sequence_generate(
        model,
        context_input_ids,
        context_attention_mask,
        doc_scores,
        fast=decoder == "sequence_fast",
        **kwargs,
    )
