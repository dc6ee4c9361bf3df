"""The four RAG decoders against brute-force references built from full (uncached) forward passes.

References: step-by-step argmax of the explicit marginal (greedy), exhaustive enumeration of every answer
over a tiny vocabulary (beam search wide enough to be exact), the generator's own ``generate`` run on each
question's documents for the RAG-Sequence candidate sets, and the marginalisation functions for scores and
posteriors. Parity with transformers' RAG classes is in test_parity_transformers.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    T5Config,
    T5ForConditionalGeneration,
)

from rag.generation import decoding
from rag.generation.decoding import (
    DecodingError,
    rag_generate,
    rag_sequence_generate,
    rag_token_generate,
)
from rag.generation.marginalize import (
    rag_sequence_doc_posteriors,
    rag_sequence_nll,
    rag_token_doc_posteriors,
    rag_token_marginal_logprobs,
    rag_token_nll,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from intra-op threads, and on a shared CPU idle OpenMP threads spin-wait
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bart(vocab: int = 40, eos_bias: float = 2.5, seed: int = 0) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0, init_std=0.3,
    )  # fmt: skip
    bart = BartForConditionalGeneration(config).eval()
    bart.final_logits_bias[0, config.eos_token_id] = eos_bias  # answers of varied lengths
    return bart


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


# T5 starts decoding with its padding id; a random T5 also likes to emit it, which would read as padding
NO_PAD_FOR_T5 = LogitsProcessorList([SuppressTokensLogitsProcessor([0])])


def random_docs(b, k, lc, seed, vocab=40, low=3, padded=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (b, k, lc), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        lengths = torch.randint(lc // 2, lc + 1, (b, k), generator=g)
        mask = (torch.arange(lc) < lengths[..., None]).long()
        ids = ids.masked_fill(mask == 0, 1 if low == 3 else 0)
    return ids, mask, 2.0 * torch.randn(b, k, generator=g)


@torch.no_grad()
def full_logits(model, ids, mask, decoder_input_ids):
    """(B, K, T, V) logits of a full forward pass for every document, no cache."""
    b, k, lc = ids.shape
    out = model(
        input_ids=ids.reshape(b * k, lc),
        attention_mask=mask.reshape(b * k, lc),
        decoder_input_ids=decoder_input_ids.repeat_interleave(k, dim=0),
    )
    return out.logits.view(b, k, decoder_input_ids.shape[1], -1)


def strip(row: list[int], pad: int) -> list[int]:
    row = list(row)
    while len(row) > 1 and row[-1] == pad:
        row.pop()
    return row


# ----------------------------------------------------------------------------------------------- RAG-Token


@pytest.mark.parametrize("make", [tiny_bart, tiny_t5], ids=["bart", "t5"])
def test_token_greedy_is_argmax_of_the_explicit_marginal(make):
    model = make()
    cfg = model.config
    t5 = cfg.model_type == "t5"
    ids, mask, doc_scores = random_docs(3, 4, 9, seed=1, low=2 if t5 else 3)
    out = rag_token_generate(
        model,
        ids,
        mask,
        doc_scores,
        max_length=9,
        forced_eos_token_id=None,
        logits_processor=NO_PAD_FOR_T5 if t5 else None,
    )

    prefix = torch.full((3, 1), cfg.decoder_start_token_id)
    done = torch.zeros(3, dtype=torch.bool)
    while prefix.shape[1] < 9 and not done.all():
        marginal = rag_token_marginal_logprobs(full_logits(model, ids, mask, prefix), doc_scores)[
            :, -1
        ]  # (B, V)
        if t5:
            marginal[:, 0] = -math.inf
        nxt = torch.where(done, cfg.pad_token_id, marginal.argmax(-1))
        prefix = torch.cat([prefix, nxt[:, None]], 1)
        done |= nxt == cfg.eos_token_id
    assert [strip(r, cfg.pad_token_id) for r in out.sequences[:, 0].tolist()] == [
        strip(r, cfg.pad_token_id) for r in prefix.tolist()
    ]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_token_beam_wide_enough_is_exhaustive_search(length_penalty):
    """With num_beams >= V^(steps-1) nothing is pruned: the best answers are those of an enumeration of every
    answer (ending at its first EOS or at max_length) ranked by sum_t log sum_z p(z|x) p(y_t|x,z,y_<t), divided
    by the answer length ** length_penalty."""
    vocab, steps, pad = 6, 3, 1
    model = tiny_bart(vocab=vocab, eos_bias=5.0)  # short and long answers both rank high
    ids, mask, doc_scores = random_docs(2, 3, 7, seed=2, vocab=vocab)
    out = rag_token_generate(
        model, ids, mask, doc_scores, num_beams=vocab ** (steps - 1), num_return_sequences=5,
        max_length=steps + 1, length_penalty=length_penalty, early_stopping="never", forced_eos_token_id=None,
        exclude_bos=False, logits_processor=LogitsProcessorList([SuppressTokensLogitsProcessor([pad])]),
    )  # fmt: skip
    eos, start = model.config.eos_token_id, model.config.decoder_start_token_id
    answers = []
    for n in range(1, steps + 1):
        for body in itertools.product([v for v in range(vocab) if v != pad], repeat=n):
            if eos in body[:-1] or (n < steps and body[-1] != eos):
                continue
            answers.append((start, *body))
    lengths = set()
    for b in range(2):
        ranked = []
        for answer in answers:
            seq = torch.tensor([answer])
            logits = full_logits(model, ids[b : b + 1], mask[b : b + 1], seq[:, :-1])
            ll = -rag_token_nll(logits, doc_scores[b : b + 1], seq[:, 1:]).item()
            ranked.append((ll / (len(answer) - 1) ** length_penalty, ll, list(answer)))
        ranked.sort(reverse=True)
        got = [strip(r, pad) for r in out.sequences[b].tolist()]
        assert got == [a for _, _, a in ranked[:5]]
        torch.testing.assert_close(
            out.scores[b], torch.tensor([ll for _, ll, _ in ranked[:5]]), rtol=1e-4, atol=1e-4
        )
        lengths |= {len(a) for a in got}
    assert len(lengths) > 1  # the case mixes answers that stop early with answers cut at max_length


def test_token_outputs_carry_scores_and_posteriors_of_the_marginalisation():
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(3, 4, 9, seed=3)
    bos, pad = model.config.bos_token_id, model.config.pad_token_id
    out = rag_token_generate(
        model,
        ids,
        mask,
        doc_scores,
        num_beams=3,
        num_return_sequences=2,
        max_length=10,
        forced_bos_token_id=bos,
    )
    b, r, t = out.sequences.shape
    assert out.token_doc_posteriors.shape == (b, r, t, 4) and out.doc_posteriors.shape == (b, r, 4)
    for i in range(r):
        seq = out.sequences[:, i]
        logits = full_logits(model, ids, mask, seq[:, :-1])
        target = seq[:, 1:]
        kw = dict(pad_token_id=pad, bos_token_id=bos, exclude_bos=True)
        torch.testing.assert_close(
            out.scores[:, i], -rag_token_nll(logits, doc_scores, target, **kw), rtol=1e-4, atol=1e-4
        )
        post = rag_token_doc_posteriors(logits, doc_scores, target, **kw)  # (B, T-1, K)
        torch.testing.assert_close(out.token_doc_posteriors[:, i, 1:], post, rtol=1e-4, atol=1e-5)
        counts = (post.sum(-1) > 0).sum(-1, keepdim=True)
        torch.testing.assert_close(out.doc_posteriors[:, i], post.sum(1) / counts, rtol=1e-4, atol=1e-5)
    assert (out.token_doc_posteriors[:, :, 0] == 0).all()  # the start token is not an answer token
    assert (out.token_doc_posteriors[:, :, 1] == 0).all()  # nor the forced BOS (exclude_bos)


# ----------------------------------------------------------------------------------------------- RAG-Sequence


def per_doc_candidates(model, ids, mask, b, settings, extra=None):
    """The generator's own beam search on each document of question b: {answer: {doc: log p(y|x,z)}}."""
    k = ids.shape[1]
    beams = settings["num_beams"]
    gen = model.generate(
        ids[b], attention_mask=mask[b], num_return_sequences=beams, logits_processor=extra, **settings
    )  # (K*beams, T)
    pad = model.config.pad_token_id
    found: dict[tuple, set] = {}
    for row, seq in enumerate(gen.tolist()):
        found.setdefault(tuple(strip(seq, pad)), set()).add(row // beams)
    assert max(len(v) for v in found.values()) <= k
    return found


def reference_sequence_decoding(model, ids, mask, doc_scores, settings, fast, extra=None):
    """Candidates from model.generate per question, scored by forced decoding through the marginalisation."""
    cfg = model.config
    bos = cfg.bos_token_id if cfg.model_type == "bart" else None
    results = []
    for b in range(ids.shape[0]):
        ranked = []
        for answer, docs in per_doc_candidates(model, ids, mask, b, settings, extra).items():
            seq = torch.tensor([answer])
            logits = full_logits(model, ids[b : b + 1], mask[b : b + 1], seq[:, :-1])  # (1, K, T-1, V)
            scores = doc_scores[b : b + 1].clone()
            if fast:  # p(y|x,z) = 0 for the documents whose beams did not produce y
                scores[0, [z for z in range(ids.shape[1]) if z not in docs]] = -math.inf
            kw = dict(pad_token_id=cfg.pad_token_id, bos_token_id=bos, exclude_bos=True)
            ll = -rag_sequence_nll(logits, scores, seq[:, 1:], **kw).item()
            if fast:  # the prior stays that of all K documents
                ll += torch.logsumexp(scores, -1).item() - torch.logsumexp(doc_scores[b], -1).item()
            ranked.append((ll, list(answer)))
        ranked.sort(reverse=True)
        results.append(ranked)
    return results


@pytest.mark.parametrize("fast", [False, True], ids=["thorough", "fast"])
@pytest.mark.parametrize("beams", [1, 3])
def test_sequence_decoding_equals_reference_on_padded_contexts(fast, beams):
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(3, 4, 10, seed=4)
    settings = dict(num_beams=beams, max_length=10, forced_bos_token_id=0, min_length=4)
    r = min(3, beams * 4)
    out = rag_sequence_generate(model, ids, mask, doc_scores, fast=fast, num_return_sequences=r, **settings)
    reference = reference_sequence_decoding(model, ids, mask, doc_scores, settings, fast)
    for b in range(3):
        expected = reference[b][:r]
        assert [strip(s, 1) for s in out.sequences[b].tolist()] == [a for _, a in expected]
        torch.testing.assert_close(
            out.scores[b], torch.tensor([s for s, _ in expected]), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("fast", [False, True], ids=["thorough", "fast"])
def test_sequence_decoding_with_t5(fast):
    model = tiny_t5()
    ids, mask, doc_scores = random_docs(2, 3, 8, seed=5, low=2)
    settings = dict(num_beams=2, max_length=7)
    out = rag_sequence_generate(
        model,
        ids,
        mask,
        doc_scores,
        fast=fast,
        num_return_sequences=2,
        logits_processor=NO_PAD_FOR_T5,
        **settings,
    )
    reference = reference_sequence_decoding(model, ids, mask, doc_scores, settings, fast, extra=NO_PAD_FOR_T5)
    for b in range(2):
        assert [strip(s, 0) for s in out.sequences[b].tolist()] == [a for _, a in reference[b][:2]]
        torch.testing.assert_close(
            out.scores[b], torch.tensor([s for s, _ in reference[b][:2]]), rtol=1e-4, atol=1e-4
        )


def test_sequence_posteriors_are_those_of_the_marginalisation():
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(2, 4, 9, seed=6)
    out = rag_sequence_generate(
        model, ids, mask, doc_scores, num_beams=2, num_return_sequences=2, max_length=9, forced_bos_token_id=0
    )
    for i in range(2):
        seq = out.sequences[:, i]
        logits = full_logits(model, ids, mask, seq[:, :-1])
        post = rag_sequence_doc_posteriors(
            logits, doc_scores, seq[:, 1:], pad_token_id=1, bos_token_id=0, exclude_bos=True
        )
        torch.testing.assert_close(out.doc_posteriors[:, i], post, rtol=1e-4, atol=1e-5)


def test_fast_lower_bounds_thorough_and_equals_it_for_identical_documents():
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(2, 3, 9, seed=7)
    settings = dict(num_beams=2, num_return_sequences=2, max_length=9, forced_bos_token_id=0, min_length=4)
    fast = rag_sequence_generate(model, ids, mask, doc_scores, fast=True, **settings)
    thorough = rag_sequence_generate(model, ids, mask, doc_scores, **settings)
    # rescore fast's answers thoroughly: dropping documents can only lower the marginal
    for i in range(2):
        seq = fast.sequences[:, i]
        logits = full_logits(model, ids, mask, seq[:, :-1])
        full = -rag_sequence_nll(
            logits, doc_scores, seq[:, 1:], pad_token_id=1, bos_token_id=0, exclude_bos=True
        )
        assert (fast.scores[:, i] <= full + 1e-5).all()

    same = ids[:, :1].expand(-1, 3, -1)
    same_mask = mask[:, :1].expand(-1, 3, -1)
    settings["num_return_sequences"] = 4  # more than the 2 distinct answers: padding rows follow
    fast = rag_sequence_generate(model, same, same_mask, doc_scores, fast=True, **settings)
    thorough = rag_sequence_generate(model, same, same_mask, doc_scores, **settings)
    assert torch.equal(fast.sequences, thorough.sequences)
    torch.testing.assert_close(fast.scores, thorough.scores, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        fast.doc_posteriors[:, :2], torch.softmax(doc_scores, -1)[:, None].expand(-1, 2, -1)
    )
    assert torch.isinf(fast.scores[:, 2:]).all() and (fast.sequences[:, 2:, 1:] == 1).all()


def test_rescoring_in_small_chunks_gives_the_same_answers():
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(2, 3, 9, seed=8)
    settings = dict(num_beams=2, num_return_sequences=2, max_length=9)
    whole = rag_sequence_generate(model, ids, mask, doc_scores, **settings)
    chunked = rag_sequence_generate(model, ids, mask, doc_scores, rescore_batch_rows=5, **settings)
    assert torch.equal(whole.sequences, chunked.sequences)
    torch.testing.assert_close(whole.scores, chunked.scores)


# ----------------------------------------------------------------------------------------------- all four decoders

ALL = [
    ("token_greedy", dict()),
    ("token_beam", dict(num_beams=3, num_return_sequences=2)),
    ("sequence_thorough", dict(num_beams=2, num_return_sequences=2)),
    ("sequence_fast", dict(num_beams=2, num_return_sequences=2)),
]


@pytest.mark.parametrize("decoder,settings", ALL, ids=[d for d, _ in ALL])
def test_test_time_n_docs_uses_the_best_scored_documents(decoder, settings):
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(3, 5, 9, seed=9)
    out = rag_generate(model, ids, mask, doc_scores, decoder=decoder, n_docs=3, max_length=9, **settings)
    best = doc_scores.topk(3, dim=1).indices.sort(dim=1).values
    assert torch.equal(out.doc_indices, best)
    cut = [x.gather(1, best[..., None].expand(-1, -1, 9)) for x in (ids, mask)]
    alone = rag_generate(model, *cut, doc_scores.gather(1, best), decoder=decoder, max_length=9, **settings)
    assert torch.equal(out.sequences, alone.sequences)
    torch.testing.assert_close(out.scores, alone.scores)
    torch.testing.assert_close(out.doc_posteriors, alone.doc_posteriors)
    assert out.doc_posteriors.shape[-1] == 3


@pytest.mark.parametrize("decoder,settings", ALL, ids=[d for d, _ in ALL])
def test_questions_are_decoded_independently_of_their_batch(decoder, settings):
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(3, 3, 9, seed=10)
    together = rag_generate(model, ids, mask, doc_scores, decoder=decoder, max_length=9, **settings)
    for b in range(3):
        alone = rag_generate(
            model,
            ids[b : b + 1],
            mask[b : b + 1],
            doc_scores[b : b + 1],
            decoder=decoder,
            max_length=9,
            **settings,
        )
        t = alone.sequences.shape[-1]
        assert torch.equal(together.sequences[b, :, :t], alone.sequences[0])
        assert (together.sequences[b, :, t:] == 1).all()
        torch.testing.assert_close(together.scores[b], alone.scores[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decoder,settings", ALL, ids=[d for d, _ in ALL])
def test_posteriors_are_distributions(decoder, settings):
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(2, 4, 9, seed=11)
    out = rag_generate(model, ids, mask, doc_scores, decoder=decoder, max_length=9, **settings)
    torch.testing.assert_close(out.doc_posteriors.sum(-1), torch.ones_like(out.scores))
    assert (out.scores <= 0).all()
    if out.token_doc_posteriors is not None:
        sums = out.token_doc_posteriors.sum(-1)
        assert ((sums - 1).abs() < 1e-5).logical_or(sums == 0).all()


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_and_settings_raise_clear_errors():
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(2, 3, 8, seed=12)
    with pytest.raises(DecodingError, match=r"\(B, K, Lc\)"):
        rag_token_generate(model, ids.flatten(0, 1), mask.flatten(0, 1), doc_scores)
    with pytest.raises(DecodingError, match="context_attention_mask"):
        rag_token_generate(model, ids, mask[:, :2], doc_scores)
    with pytest.raises(DecodingError, match="doc_scores"):
        rag_sequence_generate(model, ids, mask, doc_scores[:, :2])
    with pytest.raises(DecodingError, match="n_docs=5"):
        rag_sequence_generate(model, ids, mask, doc_scores, n_docs=5)
    with pytest.raises(DecodingError, match="unknown generation setting"):
        rag_token_generate(model, ids, mask, doc_scores, beam_size=3)
    with pytest.raises(DecodingError, match="repetition_penalty"):
        rag_token_generate(model, ids, mask, doc_scores, repetition_penalty=1.3)
    with pytest.raises(DecodingError, match="do_sample"):
        rag_sequence_generate(model, ids, mask, doc_scores, do_sample=True)
    with pytest.raises(DecodingError, match="num_return_sequences"):
        rag_token_generate(model, ids, mask, doc_scores, num_beams=2, num_return_sequences=3)
    with pytest.raises(DecodingError, match="num_return_sequences"):
        rag_sequence_generate(model, ids, mask, doc_scores, n_docs=1, num_beams=2, num_return_sequences=3)
    with pytest.raises(DecodingError, match="decoder must be one of"):
        rag_generate(model, ids, mask, doc_scores, decoder="sequence_beam")
    with pytest.raises(DecodingError, match="token_beam"):
        rag_generate(model, ids, mask, doc_scores, decoder="token_greedy", num_beams=3)
    bert = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(DecodingError, match="encoder-decoder"):
        rag_token_generate(bert, ids, mask, doc_scores)


@pytest.mark.parametrize("decoder,settings", ALL, ids=[d for d, _ in ALL])
def test_generators_without_a_reusable_cache_decode_the_same(decoder, settings, monkeypatch):
    """The shared first step and cross-attention are an optimisation for caches that expose them; without them
    every row runs its own decoder steps and the answers are the same."""
    model = tiny_bart()
    ids, mask, doc_scores = random_docs(2, 3, 9, seed=13)
    shared = rag_generate(model, ids, mask, doc_scores, decoder=decoder, max_length=9, **settings)
    original_init = decoding._EncodedContexts.__init__

    def without_shared_cache(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.first_self = self.cross = None

    monkeypatch.setattr(decoding._EncodedContexts, "__init__", without_shared_cache)
    alone = rag_generate(model, ids, mask, doc_scores, decoder=decoder, max_length=9, **settings)
    assert torch.equal(shared.sequences, alone.sequences)
    torch.testing.assert_close(shared.scores, alone.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.doc_posteriors, alone.doc_posteriors, rtol=1e-5, atol=1e-5)
