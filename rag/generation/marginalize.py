"""RAG-Token and RAG-Sequence marginalisation over retrieved documents (paper §2.1), as pure tensor functions.

All functions take unflattened tensors (see ``rag.types`` for the legend):

    seq_logits  (B, K, T, V)  generator logits for question b, document z, target position t
    doc_scores  (B, K)        retrieval logits; p(z|x) = softmax_z(doc_scores), taken here so that the
                              gradient reaches the query encoder
    target_ids  (B, T)        the token that ``seq_logits[:, :, t]`` predicts (already shifted: position t of
                              the logits is scored against ``target_ids[:, t]``)

A target position is scored unless ``target_ids`` holds ``pad_token_id`` or a negative id there (the ``-100``
convention of transformers' ``labels``). With ``exclude_bos=True`` a first target token equal to
``bos_token_id`` is not scored either: BART's ``forced_bos_token_id`` puts it there during generation, so it is
not a choice of the model (transformers' ``exclude_bos_score``).

The two heads:

    RAG-Token     p(y|x) = prod_t sum_z p(z|x) p(y_t | x, z, y_<t)
    RAG-Sequence  p(y|x) = sum_z p(z|x) prod_t p(y_t | x, z, y_<t)

Both are computed in log space with ``logsumexp``.

Where this module differs from transformers' ``RagSequenceForGeneration.get_nll`` (the authors' code), on
purpose:

* The document prior log p(z|x) is added to the summed sequence log-likelihood. transformers adds it to the
  log-probabilities of the second target position, so it is lost when that position is padding (one-token
  answers after the shift) and the loss is then not the marginal likelihood.
* Label smoothing for RAG-Sequence. transformers smooths with
  ``-logsumexp_z(sum_t sum_v log p(v|x,z,y_<t) + V log p(z|x))``, which is not the cross-entropy against any
  distribution. Here (``label_smoothing_form="posterior"``) RAG-Sequence is smoothed exactly as RAG-Token and
  plain BART are: per token, against the model's own next-token distribution
  p(v|x,y_<t) = sum_z p(z|x,y_<t) p(v|x,z,y_<t), whose product over t is the RAG-Sequence p(y|x) (chain rule).
  The smoothed loss is then the cross-entropy against (1-eps) one-hot + eps uniform at every position, the
  same objective as ``torch.nn.functional.cross_entropy(label_smoothing=eps)``. ``"transformers"`` reproduces
  the authors' form for exact replication of their training runs.

RAG-Token matches transformers' ``RagTokenForGeneration.get_nll`` exactly, smoothing included.
"""

from __future__ import annotations

from typing import Literal

import torch

from rag.errors import RagError

Reduction = Literal["none", "sum", "mean", "token_mean"]
SmoothingForm = Literal["posterior", "transformers"]

_REDUCTIONS = ("none", "sum", "mean", "token_mean")
_SMOOTHING_FORMS = ("posterior", "transformers")


class MarginalizationError(RagError, ValueError):
    """Inputs to a marginalisation function have the wrong shape, type or option value."""


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # half-precision logits lose the small differences that logsumexp over documents adds up; float64 stays
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def doc_logprobs_from_scores(doc_scores: torch.Tensor) -> torch.Tensor:
    """log p(z|x) = log_softmax over the K retrieved documents of ``doc_scores`` (B, K) -> (B, K)."""
    if doc_scores.dim() != 2:
        raise MarginalizationError(
            f"doc_scores must have shape (B, K), got {tuple(doc_scores.shape)}; pass one score per retrieved document"
        )
    return torch.log_softmax(_upcast(doc_scores), dim=-1)


def target_scored_mask(
    target_ids: torch.Tensor,
    *,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    exclude_bos: bool = False,
) -> torch.Tensor:
    """Which target positions count in the likelihood: (B, T) bool.

    Padding (``pad_token_id``) and negative ids (``-100``) are not scored; with ``exclude_bos`` a first token
    equal to ``bos_token_id`` is not scored (a no-op when the generator has no BOS token, e.g. T5).
    """
    mask = target_ids >= 0
    if pad_token_id is not None:
        mask = mask & (target_ids != pad_token_id)
    if exclude_bos and bos_token_id is not None and target_ids.shape[1] > 0:
        mask = mask.clone()
        mask[:, 0] &= target_ids[:, 0] != bos_token_id
    return mask


def _check(seq_logits: torch.Tensor, doc_scores: torch.Tensor, target_ids: torch.Tensor | None) -> None:
    if seq_logits.dim() != 4:
        raise MarginalizationError(
            f"seq_logits must have shape (B, K, T, V), got {tuple(seq_logits.shape)}; reshape the generator's "
            "(B*K, T, V) logits with .view(B, K, T, V)"
        )
    b, k = seq_logits.shape[:2]
    if tuple(doc_scores.shape) != (b, k):
        raise MarginalizationError(
            f"doc_scores has shape {tuple(doc_scores.shape)} but seq_logits carries (B, K) = {(b, k)}; "
            "give one score per (question, document) pair"
        )
    if target_ids is not None:
        if target_ids.dim() != 2 or tuple(target_ids.shape) != (b, seq_logits.shape[2]):
            raise MarginalizationError(
                f"target_ids must have shape (B, T) = {(b, seq_logits.shape[2])}, got {tuple(target_ids.shape)}; "
                "the target is the decoder input shifted left by one (see shift_tokens_left)"
            )
        if target_ids.dtype.is_floating_point or target_ids.dtype == torch.bool:
            raise MarginalizationError(f"target_ids must be integer token ids, got dtype {target_ids.dtype}")


def _check_options(label_smoothing: float, reduction: str) -> None:
    if not 0.0 <= label_smoothing < 1.0:
        raise MarginalizationError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if reduction not in _REDUCTIONS:
        raise MarginalizationError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _token_logprobs(seq_logprobs: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(y_t|x,z,y_<t) for every document, zero where not scored: (B, K, T, V) -> (B, K, T)."""
    k = seq_logprobs.shape[1]
    index = target_ids.clamp(min=0)[:, None, :, None].expand(-1, k, -1, 1)  # (B, K, T, 1)
    ll = seq_logprobs.gather(-1, index).squeeze(-1)  # (B, K, T)
    return ll.masked_fill(~mask[:, None, :], 0.0)


def _reduce(loss: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss.sum() / mask.sum().clamp(min=1)


def shift_tokens_left(decoder_input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The target that each decoder position predicts: (B, T) -> (B, T), last position padded.

    transformers' RAG feeds ``labels`` (starting with the decoder start token) as decoder inputs and scores
    them shifted left; this is that shift, so ``target_ids = shift_tokens_left(labels, pad)`` reproduces it.
    """
    pad = decoder_input_ids.new_full((decoder_input_ids.shape[0], 1), pad_token_id)
    return torch.cat([decoder_input_ids[:, 1:], pad], dim=1)  # (B, T)


def rag_token_marginal_logprobs(seq_logits: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """log sum_z p(z|x) p(v|x,z,y_<t) for every position and vocabulary item: (B, K, T, V), (B, K) -> (B, T, V)."""
    _check(seq_logits, doc_scores, None)
    seq_logprobs = torch.log_softmax(_upcast(seq_logits), dim=-1)  # (B, K, T, V)
    doc_logprobs = doc_logprobs_from_scores(doc_scores)  # (B, K)
    return torch.logsumexp(seq_logprobs + doc_logprobs[:, :, None, None], dim=1)  # (B, T, V)


def rag_token_nll(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    pad_token_id: int | None = None,
    label_smoothing: float = 0.0,
    reduction: Reduction = "none",
    bos_token_id: int | None = None,
    exclude_bos: bool = False,
) -> torch.Tensor:
    """Negative RAG-Token marginal log-likelihood -sum_t log sum_z p(z|x) p(y_t|x,z,y_<t).

    Args:
        seq_logits: (B, K, T, V) generator logits per document.
        doc_scores: (B, K) retrieval logits.
        target_ids: (B, T) the token each logit position predicts.
        label_smoothing: eps; the loss per position becomes (1-eps) * nll + eps/V * sum_v -log p(v|x,y_<t)
            with p the marginal (transformers' and torch's form).
        reduction: "none" -> (B,); "sum"; "mean" over sequences; "token_mean" over scored tokens.

    Returns:
        (B,) or a scalar.
    """
    _check(seq_logits, doc_scores, target_ids)
    _check_options(label_smoothing, reduction)
    mask = target_scored_mask(
        target_ids, pad_token_id=pad_token_id, bos_token_id=bos_token_id, exclude_bos=exclude_bos
    )
    seq_logprobs = torch.log_softmax(_upcast(seq_logits), dim=-1)  # (B, K, T, V)
    doc_logprobs = doc_logprobs_from_scores(doc_scores)  # (B, K)
    joint = seq_logprobs + doc_logprobs[:, :, None, None]  # (B, K, T, V)
    index = target_ids.clamp(min=0)[:, None, :, None].expand(-1, joint.shape[1], -1, 1)  # (B, K, T, 1)
    # log-sum-exp over documents of only the target column: no (B, T, V) marginal needed without smoothing
    ll = torch.logsumexp(joint.gather(-1, index).squeeze(-1), dim=1)  # (B, T)
    nll = -(ll.masked_fill(~mask, 0.0)).sum(-1)  # (B,)
    loss = nll
    if label_smoothing > 0:
        marginal = torch.logsumexp(joint, dim=1)  # (B, T, V)
        smooth = -(marginal.sum(-1).masked_fill(~mask, 0.0)).sum(-1)  # (B,)
        loss = (1.0 - label_smoothing) * nll + label_smoothing / seq_logits.shape[-1] * smooth
    return _reduce(loss, mask, reduction)


def rag_sequence_doc_loglik(
    seq_logits: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    exclude_bos: bool = False,
) -> torch.Tensor:
    """log p(y|x,z) = sum_t log p(y_t|x,z,y_<t) for each document: (B, K, T, V) -> (B, K)."""
    if seq_logits.dim() != 4:
        raise MarginalizationError(f"seq_logits must have shape (B, K, T, V), got {tuple(seq_logits.shape)}")
    mask = target_scored_mask(
        target_ids, pad_token_id=pad_token_id, bos_token_id=bos_token_id, exclude_bos=exclude_bos
    )
    seq_logprobs = torch.log_softmax(_upcast(seq_logits), dim=-1)  # (B, K, T, V)
    return _token_logprobs(seq_logprobs, target_ids, mask).sum(-1)  # (B, K)


def rag_sequence_next_token_logprobs(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    exclude_bos: bool = False,
) -> torch.Tensor:
    """RAG-Sequence's own next-token distribution log p(v|x,y_<t) = log sum_z p(z|x,y_<t) p(v|x,z,y_<t).

    p(z|x,y_<t) is the document posterior after the scored prefix; the product over t of these conditionals at
    the target tokens is exactly the RAG-Sequence p(y|x). (B, K, T, V), (B, K), (B, T) -> (B, T, V).
    """
    _check(seq_logits, doc_scores, target_ids)
    mask = target_scored_mask(
        target_ids, pad_token_id=pad_token_id, bos_token_id=bos_token_id, exclude_bos=exclude_bos
    )
    seq_logprobs = torch.log_softmax(_upcast(seq_logits), dim=-1)  # (B, K, T, V)
    token_ll = _token_logprobs(seq_logprobs, target_ids, mask)  # (B, K, T)
    # exclusive prefix sum: the posterior before position t has seen the scored tokens < t only
    prefix = torch.cumsum(token_ll, dim=-1) - token_ll  # (B, K, T)
    prefix_posterior = torch.log_softmax(doc_logprobs_from_scores(doc_scores)[:, :, None] + prefix, dim=1)
    return torch.logsumexp(seq_logprobs + prefix_posterior[..., None], dim=1)  # (B, T, V)


def rag_sequence_nll(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    pad_token_id: int | None = None,
    label_smoothing: float = 0.0,
    label_smoothing_form: SmoothingForm = "posterior",
    reduction: Reduction = "none",
    bos_token_id: int | None = None,
    exclude_bos: bool = False,
) -> torch.Tensor:
    """Negative RAG-Sequence marginal log-likelihood -log sum_z p(z|x) prod_t p(y_t|x,z,y_<t).

    Args:
        seq_logits: (B, K, T, V) generator logits per document.
        doc_scores: (B, K) retrieval logits.
        target_ids: (B, T) the token each logit position predicts.
        label_smoothing: eps. With ``label_smoothing_form="posterior"`` the smoothing term is
            eps/V * sum_t sum_v -log p(v|x,y_<t) with p the RAG-Sequence next-token distribution
            (``rag_sequence_next_token_logprobs``); ``"transformers"`` uses the authors' sequence-level form
            (see the module docstring for why the default differs).
        reduction: "none" -> (B,); "sum"; "mean" over sequences; "token_mean" over scored tokens.

    Returns:
        (B,) or a scalar.
    """
    _check(seq_logits, doc_scores, target_ids)
    _check_options(label_smoothing, reduction)
    if label_smoothing_form not in _SMOOTHING_FORMS:
        raise MarginalizationError(
            f"label_smoothing_form must be one of {_SMOOTHING_FORMS}, got {label_smoothing_form!r}"
        )
    mask = target_scored_mask(
        target_ids, pad_token_id=pad_token_id, bos_token_id=bos_token_id, exclude_bos=exclude_bos
    )
    seq_logprobs = torch.log_softmax(_upcast(seq_logits), dim=-1)  # (B, K, T, V)
    doc_logprobs = doc_logprobs_from_scores(doc_scores)  # (B, K)
    token_ll = _token_logprobs(seq_logprobs, target_ids, mask)  # (B, K, T)
    nll = -torch.logsumexp(doc_logprobs + token_ll.sum(-1), dim=1)  # (B,)
    loss = nll
    if label_smoothing > 0:
        vocab = seq_logits.shape[-1]
        if label_smoothing_form == "posterior":
            prefix = torch.cumsum(token_ll, dim=-1) - token_ll  # (B, K, T)
            prefix_posterior = torch.log_softmax(doc_logprobs[:, :, None] + prefix, dim=1)  # (B, K, T)
            next_token = torch.logsumexp(seq_logprobs + prefix_posterior[..., None], dim=1)  # (B, T, V)
            smooth = -(next_token.sum(-1).masked_fill(~mask, 0.0)).sum(-1)  # (B,)
        else:
            # the authors' code masks only padding here, also when the BOS score is excluded from the nll
            not_pad = target_scored_mask(target_ids, pad_token_id=pad_token_id)  # (B, T)
            per_doc = seq_logprobs.sum(-1).masked_fill(~not_pad[:, None, :], 0.0).sum(-1)  # (B, K)
            smooth = -torch.logsumexp(per_doc + vocab * doc_logprobs, dim=1)  # (B,)
        loss = (1.0 - label_smoothing) * nll + label_smoothing / vocab * smooth
    return _reduce(loss, mask, reduction)


def rag_sequence_doc_posteriors(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    exclude_bos: bool = False,
) -> torch.Tensor:
    """p(z|x,y) = p(z|x) p(y|x,z) / sum_z' p(z'|x) p(y|x,z'): which passage the whole answer came from. -> (B, K)."""
    _check(seq_logits, doc_scores, target_ids)
    doc_ll = rag_sequence_doc_loglik(
        seq_logits, target_ids, pad_token_id=pad_token_id, bos_token_id=bos_token_id, exclude_bos=exclude_bos
    )  # (B, K)
    return torch.softmax(doc_logprobs_from_scores(doc_scores) + doc_ll, dim=1)  # (B, K)


def rag_token_doc_posteriors(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    exclude_bos: bool = False,
) -> torch.Tensor:
    """Per-token posteriors p(z_t|x,y) = p(z|x) p(y_t|x,z,y_<t) / sum_z' (...), the paper's Figure 2: (B, T, K).

    Under RAG-Token each position draws its own document, independently given x, and later tokens depend on
    z_t only through y_t, so the posterior of z_t given the whole answer only involves y_t. Positions that are
    not scored (padding, excluded BOS) get all-zero rows.
    """
    _check(seq_logits, doc_scores, target_ids)
    mask = target_scored_mask(
        target_ids, pad_token_id=pad_token_id, bos_token_id=bos_token_id, exclude_bos=exclude_bos
    )
    seq_logprobs = torch.log_softmax(_upcast(seq_logits), dim=-1)  # (B, K, T, V)
    token_ll = _token_logprobs(seq_logprobs, target_ids, mask)  # (B, K, T)
    posterior = torch.softmax(doc_logprobs_from_scores(doc_scores)[:, :, None] + token_ll, dim=1)  # (B, K, T)
    return posterior.transpose(1, 2).masked_fill(~mask[..., None], 0.0)  # (B, T, K)
