"""RAG-Token / RAG-Sequence marginalisation against brute-force enumeration and plain BART."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BartConfig, BartForConditionalGeneration
from transformers.models.bart.modeling_bart import shift_tokens_right

from rag.generation.marginalize import (
    MarginalizationError,
    doc_logprobs_from_scores,
    rag_sequence_doc_posteriors,
    rag_sequence_next_token_logprobs,
    rag_sequence_nll,
    rag_token_doc_posteriors,
    rag_token_marginal_logprobs,
    rag_token_nll,
    shift_tokens_left,
    target_scored_mask,
)

PAD = 1


def random_case(b=2, k=3, t=5, v=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_logits = 2.0 * torch.randn(b, k, t, v, generator=g, dtype=dtype)
    doc_scores = 3.0 * torch.randn(b, k, generator=g, dtype=dtype)
    target = torch.randint(2, v, (b, t), generator=g)
    target[0, -2:] = PAD  # padding at the end of one answer
    target[-1, -1] = -100  # and the transformers `labels` convention on another
    return seq_logits, doc_scores, target


def scored(target, t, b):
    return int(target[b, t]) >= 0 and int(target[b, t]) != PAD


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models gain nothing from intra-op threads, and on a shared CPU idle OpenMP threads spin-wait:
    # one thread runs these tests tens of times faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- brute force with explicit loops over products


def brute_token_nll(seq_logits, doc_scores, target, eps=0.0):
    b_, k_, t_, v_ = seq_logits.shape
    out = []
    for b in range(b_):
        prior = [math.exp(doc_scores[b, z]) for z in range(k_)]
        prior = [p / sum(prior) for p in prior]
        loss = 0.0
        for t in range(t_):
            if not scored(target, t, b):
                continue
            probs = []  # marginal p(v) for every v
            for v in range(v_):
                s = 0.0
                for z in range(k_):
                    row = [math.exp(seq_logits[b, z, t, w]) for w in range(v_)]
                    s += prior[z] * row[v] / sum(row)
                probs.append(s)
            nll_t = -math.log(probs[int(target[b, t])])
            smooth_t = -sum(math.log(p) for p in probs)
            loss += (1 - eps) * nll_t + eps / v_ * smooth_t
        out.append(loss)
    return torch.tensor(out, dtype=torch.float64)


def brute_seq_prob(seq_logits, doc_scores, target, b, upto, last=None):
    """p(y_<upto | x) = sum_z p(z|x) prod_{t<upto, scored} p(y_t|x,z,y_<t), by explicit products.

    With ``last=v`` the token at position upto-1 is replaced by v (any id, padding included).
    """
    k_, v_ = seq_logits.shape[1], seq_logits.shape[3]
    prior = [math.exp(doc_scores[b, z]) for z in range(k_)]
    prior = [p / sum(prior) for p in prior]
    total = 0.0
    for z in range(k_):
        prod = prior[z]
        for t in range(upto):
            if last is not None and t == upto - 1:
                token = last
            elif scored(target, t, b):
                token = int(target[b, t])
            else:
                continue
            row = [math.exp(seq_logits[b, z, t, w]) for w in range(v_)]
            prod *= row[token] / sum(row)
        total += prod
    return total


def brute_sequence_nll(seq_logits, doc_scores, target, eps=0.0):
    b_, _, t_, v_ = seq_logits.shape
    out = []
    for b in range(b_):
        nll = -math.log(brute_seq_prob(seq_logits, doc_scores, target, b, t_))
        # the next-token distribution of RAG-Sequence by enumeration: p(y_<t, v) / p(y_<t)
        smooth = 0.0
        for t in range(t_):
            if not scored(target, t, b):
                continue
            denom = brute_seq_prob(seq_logits, doc_scores, target, b, t)
            for v in range(v_):
                smooth -= math.log(brute_seq_prob(seq_logits, doc_scores, target, b, t + 1, last=v) / denom)
        out.append((1 - eps) * nll + eps / v_ * smooth)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- the losses


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rag_token_nll_equals_enumeration(eps):
    seq_logits, doc_scores, target = random_case()
    ours = rag_token_nll(seq_logits, doc_scores, target, pad_token_id=PAD, label_smoothing=eps)
    torch.testing.assert_close(
        ours, brute_token_nll(seq_logits, doc_scores, target, eps), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_rag_sequence_nll_equals_enumeration(eps):
    seq_logits, doc_scores, target = random_case()
    ours = rag_sequence_nll(seq_logits, doc_scores, target, pad_token_id=PAD, label_smoothing=eps)
    torch.testing.assert_close(
        ours, brute_sequence_nll(seq_logits, doc_scores, target, eps), rtol=1e-10, atol=1e-10
    )


def test_heads_differ_for_k_greater_than_one():
    seq_logits, doc_scores, target = random_case()
    tok = rag_token_nll(seq_logits, doc_scores, target, pad_token_id=PAD)
    seq = rag_sequence_nll(seq_logits, doc_scores, target, pad_token_id=PAD)
    assert (tok - seq).abs().min() > 1e-3
    tok1 = rag_token_nll(seq_logits[:, :1], doc_scores[:, :1], target, pad_token_id=PAD)
    seq1 = rag_sequence_nll(seq_logits[:, :1], doc_scores[:, :1], target, pad_token_id=PAD)
    torch.testing.assert_close(tok1, seq1)


def test_rag_token_marginal_logprobs_equals_enumeration():
    seq_logits, doc_scores, _ = random_case(b=1, k=2, t=2, v=3)
    marginal = rag_token_marginal_logprobs(seq_logits, doc_scores)
    assert marginal.shape == (1, 2, 3)
    prior = torch.softmax(doc_scores, -1)
    for t in range(2):
        for v in range(3):
            expected = sum(prior[0, z] * torch.softmax(seq_logits[0, z, t], -1)[v] for z in range(2))
            assert math.isclose(marginal[0, t, v].exp().item(), expected.item(), rel_tol=1e-12)
    torch.testing.assert_close(marginal.exp().sum(-1), torch.ones(1, 2, dtype=torch.float64))


def test_sequence_next_token_distribution_obeys_the_chain_rule():
    seq_logits, doc_scores, target = random_case()
    next_token = rag_sequence_next_token_logprobs(seq_logits, doc_scores, target, pad_token_id=PAD)
    torch.testing.assert_close(next_token.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    mask = target_scored_mask(target, pad_token_id=PAD)
    at_target = next_token.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    chain = -(at_target * mask).sum(-1)
    torch.testing.assert_close(chain, rag_sequence_nll(seq_logits, doc_scores, target, pad_token_id=PAD))


@pytest.mark.parametrize("head", [rag_token_nll, rag_sequence_nll])
def test_reductions(head):
    seq_logits, doc_scores, target = random_case()
    per_seq = head(seq_logits, doc_scores, target, pad_token_id=PAD, label_smoothing=0.1)
    n_tokens = target_scored_mask(target, pad_token_id=PAD).sum()
    kw = dict(pad_token_id=PAD, label_smoothing=0.1)
    torch.testing.assert_close(head(seq_logits, doc_scores, target, reduction="sum", **kw), per_seq.sum())
    torch.testing.assert_close(head(seq_logits, doc_scores, target, reduction="mean", **kw), per_seq.mean())
    torch.testing.assert_close(
        head(seq_logits, doc_scores, target, reduction="token_mean", **kw), per_seq.sum() / n_tokens
    )


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_k1_both_heads_equal_token_cross_entropy(eps):
    seq_logits, doc_scores, target = random_case(k=1)
    labels = target.masked_fill(target == PAD, -100)
    expected = F.cross_entropy(
        seq_logits[:, 0].reshape(-1, 6),
        labels.reshape(-1),
        ignore_index=-100,
        label_smoothing=eps,
        reduction="none",
    ).view(2, 5)
    for head in (rag_token_nll, rag_sequence_nll):
        ours = head(seq_logits, doc_scores, target, pad_token_id=PAD, label_smoothing=eps)
        torch.testing.assert_close(ours, expected.sum(-1))


def tiny_bart(seed=0):
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        dropout=0.0, init_std=0.2,
    )  # fmt: skip
    return BartForConditionalGeneration(config).eval()


def test_rag_token_k1_equals_plain_bart_loss():
    bart = tiny_bart()
    g = torch.Generator().manual_seed(1)
    context = torch.randint(3, 40, (3, 9), generator=g)
    labels = torch.randint(3, 40, (3, 6), generator=g)
    labels[1, -2:] = -100  # BART's own padding convention for `labels`
    with torch.no_grad():
        out = bart(input_ids=context, labels=labels)
    seq_logits = out.logits[:, None]  # (B, 1, T, V)
    ours = rag_token_nll(seq_logits, torch.zeros(3, 1), labels, pad_token_id=PAD, reduction="token_mean")
    torch.testing.assert_close(ours, out.loss)


def test_identical_documents_make_both_heads_equal_plain_bart():
    bart = tiny_bart()
    g = torch.Generator().manual_seed(2)
    context = torch.randint(3, 40, (2, 9), generator=g)
    labels = torch.randint(3, 40, (2, 6), generator=g)
    labels[0, -1] = PAD
    decoder_input_ids = shift_tokens_right(labels, PAD, bart.config.decoder_start_token_id)
    with torch.no_grad():
        logits = bart(input_ids=context, decoder_input_ids=decoder_input_ids).logits  # (B, T, V)
    plain = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=PAD, reduction="none").sum(-1)
    seq_logits = logits[:, None].expand(-1, 4, -1, -1)  # the same passage retrieved 4 times
    doc_scores = torch.randn(2, 4) * 5  # any prior
    for head in (rag_token_nll, rag_sequence_nll):
        torch.testing.assert_close(head(seq_logits, doc_scores, labels, pad_token_id=PAD), plain)
    # posteriors then equal the prior: the answer says nothing about which copy produced it
    torch.testing.assert_close(
        rag_sequence_doc_posteriors(seq_logits, doc_scores, labels, pad_token_id=PAD),
        torch.softmax(doc_scores, -1),
    )


def test_infinitely_unlikely_document_contributes_nothing():
    seq_logits, doc_scores, target = random_case()
    masked_scores = doc_scores.clone()
    masked_scores[:, 1] = -math.inf  # e.g. fewer passages retrieved than K
    keep = [0, 2]
    for head in (rag_token_nll, rag_sequence_nll):
        full = head(seq_logits, masked_scores, target, pad_token_id=PAD, label_smoothing=0.1)
        dropped = head(
            seq_logits[:, keep], doc_scores[:, keep], target, pad_token_id=PAD, label_smoothing=0.1
        )
        torch.testing.assert_close(full, dropped)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("head", [rag_token_nll, rag_sequence_nll])
def test_gradients_reach_doc_scores_and_match_brute_force(head):
    seq_logits, doc_scores, target = random_case()
    doc_scores.requires_grad_(True)
    seq_logits.requires_grad_(True)
    head(seq_logits, doc_scores, target, pad_token_id=PAD, reduction="sum").backward()
    assert doc_scores.grad.abs().sum() > 0

    # the brute force written with differentiable torch ops in explicit loops
    ds = doc_scores.detach().clone().requires_grad_(True)
    sl = seq_logits.detach().clone().requires_grad_(True)
    total = 0.0
    for b in range(2):
        prior = torch.softmax(ds[b], -1)
        probs = [torch.softmax(sl[b, z], -1) for z in range(3)]  # (T, V) each
        if head is rag_token_nll:
            for t in range(5):
                if scored(target, t, b):
                    total = total - torch.log(sum(prior[z] * probs[z][t, target[b, t]] for z in range(3)))
        else:
            mix = 0.0
            for z in range(3):
                prod = prior[z]
                for t in range(5):
                    if scored(target, t, b):
                        prod = prod * probs[z][t, target[b, t]]
                mix = mix + prod
            total = total - torch.log(mix)
    total.backward()
    torch.testing.assert_close(doc_scores.grad, ds.grad)
    torch.testing.assert_close(seq_logits.grad, sl.grad)


@pytest.mark.parametrize("head", [rag_token_nll, rag_sequence_nll])
def test_gradients_match_finite_differences(head):
    seq_logits, doc_scores, target = random_case(b=1, k=2, t=3, v=4)
    doc_scores.requires_grad_(True)
    seq_logits.requires_grad_(True)

    def f(ds, sl):
        return head(sl, ds, target, pad_token_id=PAD, label_smoothing=0.1)

    assert torch.autograd.gradcheck(f, (doc_scores, seq_logits))


# ---------------------------------------------------------------- posteriors


def test_sequence_posteriors_equal_enumeration():
    seq_logits, doc_scores, target = random_case()
    post = rag_sequence_doc_posteriors(seq_logits, doc_scores, target, pad_token_id=PAD)
    assert post.shape == (2, 3)
    for b in range(2):
        joint = []
        for z in range(3):
            one = torch.zeros_like(doc_scores[:, :1])
            joint.append(
                brute_seq_prob(seq_logits[:, z : z + 1], one, target, b, 5)
                * torch.softmax(doc_scores[b], -1)[z].item()
            )
        for z in range(3):
            assert math.isclose(post[b, z].item(), joint[z] / sum(joint), rel_tol=1e-10)


def test_token_posteriors_equal_bayes_rule_per_token():
    seq_logits, doc_scores, target = random_case()
    post = rag_token_doc_posteriors(seq_logits, doc_scores, target, pad_token_id=PAD)
    assert post.shape == (2, 5, 3)
    for b in range(2):
        prior = torch.softmax(doc_scores[b], -1)
        for t in range(5):
            if not scored(target, t, b):
                assert post[b, t].abs().sum() == 0
                continue
            like = torch.stack([torch.softmax(seq_logits[b, z, t], -1)[target[b, t]] for z in range(3)])
            torch.testing.assert_close(post[b, t], prior * like / (prior * like).sum())


def test_exclude_bos_drops_only_a_leading_bos():
    seq_logits, doc_scores, target = random_case()
    bos = 0
    target[0, 0] = bos  # first answer starts with BOS, the second does not
    with_bos = target.clone()
    without_bos = target.clone()
    without_bos[0, 0] = -100
    for head in (rag_token_nll, rag_sequence_nll):
        excluded = head(
            seq_logits, doc_scores, with_bos, pad_token_id=PAD, bos_token_id=bos, exclude_bos=True
        )
        torch.testing.assert_close(excluded, head(seq_logits, doc_scores, without_bos, pad_token_id=PAD))
        # a model without BOS (T5) makes the flag a no-op
        torch.testing.assert_close(
            head(seq_logits, doc_scores, with_bos, pad_token_id=PAD, bos_token_id=None, exclude_bos=True),
            head(seq_logits, doc_scores, with_bos, pad_token_id=PAD),
        )


def test_shift_tokens_left():
    labels = torch.tensor([[2, 0, 7, 8, 2], [2, 0, 9, 2, 1]])
    assert shift_tokens_left(labels, PAD).tolist() == [[0, 7, 8, 2, 1], [0, 9, 2, 1, 1]]


# ---------------------------------------------------------------- bad input


def test_bad_shapes_and_options_raise_clear_errors():
    seq_logits, doc_scores, target = random_case()
    with pytest.raises(MarginalizationError, match=r"\(B, K, T, V\)"):
        rag_token_nll(seq_logits.flatten(0, 1), doc_scores, target)
    with pytest.raises(MarginalizationError, match="doc_scores"):
        rag_sequence_nll(seq_logits, doc_scores[:, :2], target)
    with pytest.raises(MarginalizationError, match="target_ids"):
        rag_token_nll(seq_logits, doc_scores, target[:, :3])
    with pytest.raises(MarginalizationError, match="integer"):
        rag_token_nll(seq_logits, doc_scores, target.double())
    with pytest.raises(MarginalizationError, match="reduction"):
        rag_token_nll(seq_logits, doc_scores, target, reduction="avg")
    with pytest.raises(MarginalizationError, match="label_smoothing"):
        rag_sequence_nll(seq_logits, doc_scores, target, label_smoothing=1.5)
    with pytest.raises(MarginalizationError, match="label_smoothing_form"):
        rag_sequence_nll(seq_logits, doc_scores, target, label_smoothing=0.1, label_smoothing_form="fairseq")
    with pytest.raises(MarginalizationError, match=r"\(B, K\)"):
        doc_logprobs_from_scores(doc_scores[0])
