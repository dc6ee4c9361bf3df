"""Parity with transformers' RagTokenForGeneration / RagSequenceForGeneration on the same weights and documents.

A tiny RAG model is built around a tiny BART; its DPR question encoder exists only so that the RAG classes can
be constructed: ``context_input_ids``, ``context_attention_mask`` and ``doc_scores`` are passed directly, so no
retriever is involved. Where this project deliberately differs from transformers, a test shows the difference.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    LogitsProcessorList,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    SuppressTokensLogitsProcessor,
    T5Config,
    T5ForConditionalGeneration,
)

from rag.generation.decoding import rag_sequence_generate, rag_token_generate
from rag.generation.marginalize import rag_sequence_nll, rag_token_nll, shift_tokens_left

V, PAD, BOS, EOS = 40, 1, 0, 2


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from intra-op threads, and on a shared CPU idle OpenMP threads spin-wait:
    # one thread runs these tests tens of times faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bart(seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, init_std=0.3,
    )  # fmt: skip
    bart = BartForConditionalGeneration(config).eval()
    # random weights rarely pick EOS; a bias gives answers of varied lengths, as real ones have
    bart.final_logits_bias[0, EOS] = 2.5
    return bart


def tiny_rag(cls, bart, n_docs: int, **config_kwargs):
    question_config = DPRConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config = RagConfig.from_question_encoder_generator_configs(
        question_config, bart.config, n_docs=n_docs, **config_kwargs
    )
    return cls(config=config, question_encoder=DPRQuestionEncoder(question_config), generator=bart).eval()


def random_docs(b: int, k: int, lc: int, seed: int, padded: bool = False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, k, lc), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        lengths = torch.randint(lc // 2, lc + 1, (b, k), generator=g)
        mask = (torch.arange(lc) < lengths[..., None]).long()
        ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask, 2.0 * torch.randn(b, k, generator=g)


def random_labels(b: int, t: int, seed: int, bos: bool = False):
    """Decoder inputs as transformers' RAG takes them: start token, (BOS,) answer, EOS, padding."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((b, t), PAD)
    for i in range(b):
        n = int(torch.randint(2, t - 2 - bos, (1,), generator=g))
        body = torch.randint(3, V, (n,), generator=g).tolist()
        row = [EOS] + ([BOS] if bos else []) + body + [EOS]
        labels[i, : len(row)] = torch.tensor(row)
    return labels


def generator_logits(bart, ids, mask, labels):
    """seq_logits (B, K, T, V) with ``labels`` as decoder inputs, like RagModel.forward does."""
    b, k, lc = ids.shape
    out = bart(
        input_ids=ids.view(b * k, lc),
        attention_mask=mask.view(b * k, lc),
        decoder_input_ids=labels.repeat_interleave(k, dim=0),
    )
    return out.logits.view(b, k, labels.shape[1], -1)


def strip(sequences: torch.Tensor) -> list[list[int]]:
    rows = []
    for row in sequences.reshape(-1, sequences.shape[-1]).tolist():
        while row and row[-1] == PAD:
            row.pop()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduce", [False, True])
def test_rag_token_loss_matches_transformers(eps, reduce):
    bart = tiny_bart()
    hf = tiny_rag(RagTokenForGeneration, bart, n_docs=3, label_smoothing=eps)
    ids, mask, doc_scores = random_docs(2, 3, 9, seed=1)
    labels = random_labels(2, 8, seed=2)
    doc_scores_hf = doc_scores.clone().requires_grad_(True)
    hf_loss = hf(
        context_input_ids=ids.view(6, 9),
        context_attention_mask=mask.view(6, 9),
        doc_scores=doc_scores_hf,
        labels=labels,
        reduce_loss=reduce,
    ).loss
    doc_scores_ours = doc_scores.clone().requires_grad_(True)
    ours = rag_token_nll(
        generator_logits(bart, ids, mask, labels),
        doc_scores_ours,
        shift_tokens_left(labels, PAD),
        pad_token_id=PAD,
        label_smoothing=eps,
        reduction="sum" if reduce else "none",
    )
    torch.testing.assert_close(ours, hf_loss, rtol=1e-5, atol=1e-5)
    hf_loss.sum().backward()
    ours.sum().backward()
    torch.testing.assert_close(doc_scores_ours.grad, doc_scores_hf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduce", [False, True])
@pytest.mark.parametrize("exclude_bos", [False, True])
def test_rag_sequence_loss_matches_transformers(eps, reduce, exclude_bos):
    bart = tiny_bart()
    hf = tiny_rag(RagSequenceForGeneration, bart, n_docs=3, label_smoothing=eps)
    ids, mask, doc_scores = random_docs(2, 3, 9, seed=3)
    labels = random_labels(2, 8, seed=4, bos=True)
    doc_scores_hf = doc_scores.clone().requires_grad_(True)
    hf_loss = hf(
        context_input_ids=ids.view(6, 9),
        context_attention_mask=mask.view(6, 9),
        doc_scores=doc_scores_hf,
        labels=labels,
        reduce_loss=reduce,
        exclude_bos_score=exclude_bos,
    ).loss
    doc_scores_ours = doc_scores.clone().requires_grad_(True)
    ours = rag_sequence_nll(
        generator_logits(bart, ids, mask, labels),
        doc_scores_ours,
        shift_tokens_left(labels, PAD),
        pad_token_id=PAD,
        label_smoothing=eps,
        label_smoothing_form="transformers",
        reduction="sum" if reduce else "none",
        bos_token_id=BOS,
        exclude_bos=exclude_bos,
    )
    torch.testing.assert_close(ours, hf_loss, rtol=1e-5, atol=1e-5)
    hf_loss.sum().backward()
    ours.sum().backward()
    torch.testing.assert_close(doc_scores_ours.grad, doc_scores_hf.grad, rtol=1e-5, atol=1e-6)


def test_rag_sequence_label_smoothing_differs_from_transformers_by_design():
    """Our default smooths against RAG-Sequence's own next-token distribution (a cross-entropy); the authors'
    form takes a log-sum-exp over documents of token-summed log-probabilities. They agree when one document
    decides everything (K=1) and differ otherwise."""
    bart = tiny_bart()
    labels = random_labels(2, 8, seed=6)
    target = shift_tokens_left(labels, PAD)
    for k, should_match in ((1, True), (3, False)):
        hf = tiny_rag(RagSequenceForGeneration, bart, n_docs=k, label_smoothing=0.1)
        ids, mask, doc_scores = random_docs(2, k, 9, seed=5)
        with torch.no_grad():
            hf_loss = hf(
                context_input_ids=ids.view(2 * k, 9),
                context_attention_mask=mask.view(2 * k, 9),
                doc_scores=doc_scores,
                labels=labels,
            ).loss
            ours = rag_sequence_nll(
                generator_logits(bart, ids, mask, labels),
                doc_scores,
                target,
                pad_token_id=PAD,
                label_smoothing=0.1,
            )
        assert torch.allclose(ours, hf_loss, rtol=1e-5, atol=1e-5) == should_match


def test_transformers_rag_sequence_drops_the_document_prior_for_one_token_answers():
    """transformers adds log p(z|x) at the second target position; when that position is padding (a one-token
    answer) the prior is lost and its loss is -log sum_z p(y|x,z), not the marginal -log sum_z p(z|x) p(y|x,z)."""
    bart = tiny_bart()
    k = 3
    hf = tiny_rag(RagSequenceForGeneration, bart, n_docs=k)
    ids, mask, doc_scores = random_docs(2, k, 9, seed=7)
    labels = torch.tensor(
        [[EOS, 17, PAD, PAD], [EOS, EOS, PAD, PAD]]
    )  # targets "17 <pad>.." and "</s> <pad>.."
    target = shift_tokens_left(labels, PAD)
    with torch.no_grad():
        hf_loss = hf(
            context_input_ids=ids.view(2 * k, 9),
            context_attention_mask=mask.view(2 * k, 9),
            doc_scores=doc_scores,
            labels=labels,
        ).loss
        seq_logits = generator_logits(bart, ids, mask, labels)
    ours = rag_sequence_nll(seq_logits, doc_scores, target, pad_token_id=PAD)
    without_prior = rag_sequence_nll(
        seq_logits, torch.zeros_like(doc_scores), target, pad_token_id=PAD
    ) - math.log(k)
    torch.testing.assert_close(hf_loss, without_prior)
    assert (hf_loss - ours).abs().min() > 1e-3


# ----------------------------------------------------------------------------------------------- RAG-Token generate

TOKEN_SETTINGS = [
    dict(num_beams=1, max_length=12),
    dict(num_beams=1, max_length=10, forced_bos_token_id=BOS, no_repeat_ngram_size=2, min_length=5),
    dict(num_beams=3, max_length=12),
    dict(num_beams=4, num_return_sequences=3, max_length=10, forced_bos_token_id=BOS),
    dict(num_beams=3, num_return_sequences=2, max_length=11, length_penalty=2.0, early_stopping=True),
    dict(num_beams=3, max_length=11, length_penalty=-0.5, early_stopping="never", no_repeat_ngram_size=2),
]


@pytest.mark.parametrize("settings", TOKEN_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_rag_token_generate_matches_transformers(settings):
    bart = tiny_bart()
    b, k, lc = 4, 3, 10
    hf = tiny_rag(RagTokenForGeneration, bart, n_docs=k)
    ids, mask, doc_scores = random_docs(b, k, lc, seed=11, padded=True)
    expected = hf.generate(
        context_input_ids=ids.view(b * k, lc),
        context_attention_mask=mask.view(b * k, lc),
        doc_scores=doc_scores,
        n_docs=k,
        **settings,
    )
    ours = rag_token_generate(bart, ids, mask, doc_scores, **settings)
    assert strip(ours.sequences) == strip(expected)
    assert len({tuple(r) for r in strip(expected)}) > 1  # the case is not degenerate


# ----------------------------------------------------------------------------------------------- RAG-Sequence generate

# BART's own generation config forces BOS; min_length keeps the answers from collapsing to "<s></s>"
SEQUENCE_SETTINGS = [
    dict(num_beams=1, max_length=12, forced_bos_token_id=BOS, min_length=4),
    dict(num_beams=3, max_length=12, forced_bos_token_id=BOS, min_length=5),
    dict(
        num_beams=3,
        num_return_sequences=3,
        max_length=10,
        forced_bos_token_id=BOS,
        min_length=4,
        length_penalty=0.5,
    ),
    dict(num_beams=2, num_return_sequences=2, max_length=10, forced_bos_token_id=BOS, no_repeat_ngram_size=2),
]


@pytest.mark.parametrize(
    "settings", SEQUENCE_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items())
)
def test_rag_sequence_thorough_matches_transformers(settings):
    bart = tiny_bart()
    b, k, lc = 4, 3, 10
    hf = tiny_rag(RagSequenceForGeneration, bart, n_docs=k)
    # no padding in the contexts: transformers generates the candidates without the attention mask (see below)
    ids, mask, doc_scores = random_docs(b, k, lc, seed=12)
    expected = hf.generate(
        context_input_ids=ids.view(b * k, lc),
        context_attention_mask=mask.view(b * k, lc),
        doc_scores=doc_scores,
        n_docs=k,
        **settings,
    )
    ours = rag_sequence_generate(bart, ids, mask, doc_scores, **settings)
    assert strip(ours.sequences) == strip(expected)
    assert len({tuple(r) for r in strip(expected)}) > 1


def test_transformers_rag_sequence_generates_candidates_attending_to_padding():
    """transformers' thorough decoding calls the generator's generate with attention_mask=None, and transformers
    5 infers no mask for encoder-decoders, so the candidate beams attend to the padding of the contexts. Ours
    masks it: its answers do not depend on how much padding the contexts carry, and equal transformers' on the
    same contexts without padding."""
    bart = tiny_bart()
    b, k, lc = 4, 3, 8
    hf = tiny_rag(RagSequenceForGeneration, bart, n_docs=k)
    ids, mask, doc_scores = random_docs(b, k, lc, seed=13)
    padded_ids = torch.cat([ids, torch.full((b, k, 4), PAD)], dim=-1)
    padded_mask = torch.cat([mask, torch.zeros(b, k, 4, dtype=mask.dtype)], dim=-1)
    settings = dict(num_beams=3, max_length=10, forced_bos_token_id=BOS, min_length=5)

    def hf_generate(i, m):
        return strip(
            hf.generate(
                context_input_ids=i.flatten(0, 1),
                context_attention_mask=m.flatten(0, 1),
                doc_scores=doc_scores,
                n_docs=k,
                **settings,
            )
        )

    ours_padded = strip(
        rag_sequence_generate(bart, padded_ids, padded_mask, doc_scores, **settings).sequences
    )
    ours_plain = strip(rag_sequence_generate(bart, ids, mask, doc_scores, **settings).sequences)
    assert ours_padded == ours_plain == hf_generate(ids, mask)
    assert hf_generate(padded_ids, padded_mask) != ours_padded


def test_rag_sequence_honours_test_time_n_docs_where_transformers_does_not():
    """huggingface/transformers#14394: RagSequenceForGeneration.generate(n_docs=...) rescoring uses
    config.n_docs. Ours uses the n_docs best documents (here the first two: the scores are sorted) and equals
    both itself on inputs cut to them and transformers built with config.n_docs = n_docs."""
    bart = tiny_bart()
    b, k, lc, n = 3, 4, 10, 2
    ids, mask, doc_scores = random_docs(b, k, lc, seed=14)
    doc_scores = doc_scores.sort(dim=1, descending=True).values
    settings = dict(num_beams=2, max_length=9, forced_bos_token_id=BOS, min_length=4)
    cut = (ids[:, :n], mask[:, :n], doc_scores[:, :n])

    ours = rag_sequence_generate(bart, ids, mask, doc_scores, n_docs=n, **settings)
    assert strip(ours.sequences) == strip(rag_sequence_generate(bart, *cut, **settings).sequences)
    assert ours.doc_posteriors.shape == (b, 1, n)
    assert ours.doc_indices.tolist() == [[0, 1]] * b

    def hf_generate(config_n_docs):
        hf = tiny_rag(RagSequenceForGeneration, bart, n_docs=config_n_docs)
        return strip(
            hf.generate(
                context_input_ids=cut[0].flatten(0, 1),
                context_attention_mask=cut[1].flatten(0, 1),
                doc_scores=cut[2],
                n_docs=n,
                **settings,
            )
        )

    assert strip(ours.sequences) == hf_generate(config_n_docs=n)
    try:
        broken = hf_generate(config_n_docs=k)
    except AssertionError:  # the rescoring reshapes by config.n_docs and trips over the row count
        broken = None
    assert broken != strip(ours.sequences)


@pytest.mark.parametrize(
    "settings", [dict(num_beams=1, max_length=8), dict(num_beams=3, num_return_sequences=2, max_length=8)]
)
def test_rag_token_generate_with_a_t5_generator_matches_transformers(settings):
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(
            vocab_size=V,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )  # fmt: skip
    ).eval()
    b, k, lc = 3, 3, 8
    hf = tiny_rag(RagTokenForGeneration, t5, n_docs=k)
    ids, mask, doc_scores = random_docs(b, k, lc, seed=15)
    no_pad = LogitsProcessorList(
        [SuppressTokensLogitsProcessor([0])]
    )  # T5 starts with, and likes, its pad id
    expected = hf.generate(
        context_input_ids=ids.view(b * k, lc),
        context_attention_mask=mask.view(b * k, lc),
        doc_scores=doc_scores,
        n_docs=k,
        logits_processor=no_pad,
        **settings,
    )
    ours = rag_token_generate(t5, ids, mask, doc_scores, logits_processor=no_pad, **settings)
    assert ours.sequences.flatten(0, 1).tolist() == expected.tolist()
    assert len({tuple(r) for r in expected.tolist()}) > 1
