"""RagModel against references: brute-force retrieval, explicit gradients, plain BART, transformers' RAG classes.

Tiny parts throughout: 2-layer BERTs from ``tests/fixtures/tiny_bert`` (seeded random weights, its 199-token
WordPiece vocabulary), a 2-layer BART on the same tokenizer, and 30 real mini-wiki passages (the gold passages
of 4 SQuAD-open and 4 NQ-gold dev questions plus distractors) behind an exact index.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from rag.data.miniwiki import load_corpus, load_questions
from rag.generation.context import build_context_inputs, build_labels
from rag.generation.decoding import rag_token_generate
from rag.generation.generator import build_tiny_bart
from rag.generation.marginalize import rag_token_nll
from rag.model import RagModel, RagModelError, tiny_bert_encoder
from rag.retrieval.encoders import DocumentEncoder, QueryEncoder
from rag.retrieval.index import FlatIndex
from rag.retrieval.retriever import BM25Retriever, DenseRetriever

TINY_BERT = Path(__file__).parent / "fixtures" / "tiny_bert"
N_PASSAGES = 30
# the fixture's vocab.txt lists one token ("a") twice: ids run to 198 while len(tokenizer) is 198
VOCAB = BertConfig.from_pretrained(TINY_BERT).vocab_size


# the fixture's vocab.txt lists one token twice, so ids run to 198 while len(tokenizer) is 198
VOCAB = BertConfig.from_pretrained(TINY_BERT).vocab_size


def tiny_encoder(cls, seed: int = 0):
    torch.manual_seed(seed)
    model = BertModel(BertConfig.from_pretrained(TINY_BERT), add_pooling_layer=False).eval()
    return cls(model, AutoTokenizer.from_pretrained(TINY_BERT), pooling="mean", name="tiny", max_length=64)


def real_questions():
    """4 SQuAD-open and 4 NQ-gold dev questions of the mini-wiki (real questions, real gold passages)."""
    return load_questions("squad_open", "dev")[:4] + load_questions("nq_gold", "dev")[:4]


def real_passages(questions) -> list:
    """The gold passages of ``questions`` plus the first other passages, N_PASSAGES in all, in corpus order."""
    corpus = load_corpus()
    gold = {g for q in questions for g in q.gold_passage_ids}
    keep = [p for p in corpus if p.id in gold]
    keep += [p for p in corpus if p.id not in gold][: N_PASSAGES - len(keep)]
    order = {p.id: i for i, p in enumerate(corpus)}
    return sorted(keep, key=lambda p: order[p.id])


@pytest.fixture(scope="module")
def parts():
    questions = real_questions()
    passages = real_passages(questions)
    doc_encoder = tiny_encoder(DocumentEncoder, seed=1)
    doc_embeds = doc_encoder.encode(([p.title for p in passages], [p.text for p in passages])).numpy()
    index = FlatIndex(verbose=False).build(doc_embeds)
    return {
        "questions": questions,
        "targets": [q.answers[0] for q in questions],
        "passages": passages,
        "doc_embeds": doc_embeds,
        "retriever": DenseRetriever(index, passages, None, doc_embeds=doc_embeds),
        "bm25": BM25Retriever.from_passages(passages),
    }


def make_model(parts, mode="learned", head="token", **kwargs) -> RagModel:
    generator = build_tiny_bart(TINY_BERT, vocab_size=VOCAB, d_model=32, ffn_dim=64, seed=0).eval()
    retriever = {"learned": parts["retriever"], "frozen": parts["retriever"], "bm25": parts["bm25"]}.get(mode)
    query_encoder = tiny_encoder(QueryEncoder, seed=2) if mode in ("learned", "frozen") else None
    kwargs.setdefault("max_context_length", 64)
    return RagModel(generator, query_encoder, retriever, head=head, retriever_mode=mode, **kwargs)


# ------------------------------------------------------------------------------------------ retrieval


def test_learned_doc_scores_are_exact_inner_products_and_train_the_query_encoder(parts):
    model = make_model(parts, n_docs=4, reduction="sum").eval()
    out = model(parts["questions"], parts["targets"])
    texts = [q.question for q in parts["questions"]]
    with torch.no_grad():
        q = model.query_encoder.encode(texts).numpy()  # (B, D)
    scores = q @ parts["doc_embeds"].T  # (B, N) brute force
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(out.retrieval.doc_ids.numpy(), ids)
    np.testing.assert_allclose(out.doc_scores.detach().numpy(), np.take_along_axis(scores, ids, 1), atol=1e-5)
    assert out.seq_logits.shape[:2] == (8, 4)

    out.loss.backward()
    grads = {n: p.grad for n, p in model.query_encoder.named_parameters()}
    assert all(g is not None for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    # reference: the same loss with doc_scores recomputed from a fresh q(x) and the generator's logits fixed;
    # q(x) gets its gradient through the doc scores alone, so the two gradients must agree
    reference = tiny_encoder(QueryEncoder, seed=2).eval()
    batch = reference.tokenize(texts)
    q_ref = reference(**batch)  # (B, D)
    doc_scores = torch.einsum("bd,bkd->bk", q_ref, torch.from_numpy(parts["doc_embeds"][ids]))  # (B, K)
    rag_token_nll(
        out.seq_logits.detach(),
        doc_scores,
        out.labels,
        pad_token_id=model.generator.pad_token_id,
        reduction="sum",
    ).backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_step_searches_in_float32_and_trains_the_query_encoder(parts):
    # Lightning's precision=bf16-mixed runs the step under torch.autocast: the exact search must stay float32
    # (the same ids and scores as outside autocast), the loss finite, the query encoder trained
    index = parts["retriever"].index
    q = np.random.default_rng(0).standard_normal((8, parts["doc_embeds"].shape[1])).astype(np.float32)
    plain = index.search(q, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = index.search(q, 4)
        model = make_model(parts, n_docs=4).train()
        out = model(parts["questions"], parts["targets"])
    assert cast[0].dtype == np.float32
    np.testing.assert_array_equal(cast[1], plain[1])
    np.testing.assert_array_equal(cast[0], plain[0])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.query_encoder.parameters())


@pytest.mark.parametrize("mode", ["frozen", "bm25"])
def test_frozen_and_bm25_retrievers_get_no_gradient(parts, mode):
    model = make_model(parts, mode=mode, n_docs=3).train()
    out = model(parts["questions"], parts["targets"])
    assert not out.doc_scores.requires_grad
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    if mode == "frozen":
        assert not model.query_encoder.training  # no dropout in a frozen retriever, even in train mode
        assert all(not p.requires_grad and p.grad is None for p in model.query_encoder.parameters())
    else:
        assert model.query_encoder is None
        texts = [q.question for q in parts["questions"]]
        scores, ids = parts["bm25"].bm25.search(texts, 3)  # BM25 scores are the doc logits
        np.testing.assert_array_equal(out.retrieval.doc_ids.numpy(), ids)
        np.testing.assert_allclose(out.doc_scores.numpy(), scores, rtol=1e-6)


def test_doc_score_scale_sharpens_dense_logits_only(parts):
    texts = [q.question for q in parts["questions"]]
    plain = make_model(parts, n_docs=4).eval()
    scaled = make_model(parts, n_docs=4, doc_score_scale=20.0).eval()
    out1, out20 = plain.retrieve(texts), scaled.retrieve(texts)
    np.testing.assert_array_equal(out1.doc_ids.numpy(), out20.doc_ids.numpy())  # same passages, same order
    torch.testing.assert_close(out20.doc_scores, 20.0 * out1.doc_scores)
    p1, p20 = torch.softmax(out1.doc_scores, -1), torch.softmax(out20.doc_scores, -1)
    assert bool(
        (p20.max(-1).values >= p1.max(-1).values - 1e-6).all()
    )  # a sharper prior, never a flatter one
    scaled.train()(parts["questions"], parts["targets"]).loss.backward()  # the gradient still reaches q(x)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in scaled.query_encoder.parameters())
    bm25 = make_model(parts, mode="bm25", n_docs=3, doc_score_scale=20.0)
    scores, _ = parts["bm25"].bm25.search(texts, 3)
    np.testing.assert_allclose(bm25.retrieve(texts).doc_scores.numpy(), scores, rtol=1e-6)  # BM25 as it is
    for bad in (0, -1.0, float("inf"), "x"):
        with pytest.raises(RagModelError, match="doc_score_scale"):
            make_model(parts, doc_score_scale=bad)


def test_index_and_passages_stay_out_of_the_state_dict(parts):
    model = make_model(parts)
    keys = set(model.state_dict())
    expected = {f"generator.{k}" for k in model.generator.state_dict()} | {
        f"query_encoder.{k}" for k in model.query_encoder.state_dict()
    }
    assert keys == expected
    assert model.retriever is parts["retriever"] and "retriever" not in dict(model.named_modules())


# ------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("head", ["token", "sequence"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_closed_book_equals_plain_bart_nll(parts, head, eps):
    model = make_model(parts, mode="none", head=head, label_smoothing=eps, reduction="token_mean").eval()
    out = model(parts["questions"], parts["targets"])
    assert out.seq_logits.shape[1] == 1 and out.retrieval is None
    gen = model.generator
    enc = gen.tokenizer([q.question for q in parts["questions"]], padding=True, return_tensors="pt")
    labels = build_labels(parts["targets"], gen)
    with torch.no_grad():
        logits = gen.model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            decoder_input_ids=gen.shift_right(labels),
        ).logits  # (B, T, V)
    reference = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=gen.pad_token_id, label_smoothing=eps
    )
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-5)


def _transformers_rag(cls, model: RagModel, n_docs: int, eps: float):
    question_config = DPRConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    config = RagConfig.from_question_encoder_generator_configs(
        question_config, model.generator.config, n_docs=n_docs, label_smoothing=eps
    )
    return cls(
        config=config, question_encoder=DPRQuestionEncoder(question_config), generator=model.generator.model
    )


@pytest.mark.parametrize(
    "head, cls, eps",
    [
        ("token", RagTokenForGeneration, 0.0),
        ("token", RagTokenForGeneration, 0.1),
        ("sequence", RagSequenceForGeneration, 0.0),
    ],
)
def test_loss_equals_transformers_rag_on_the_same_retrieved_docs(parts, head, cls, eps):
    k = 3
    model = make_model(parts, head=head, n_docs=k, label_smoothing=eps, reduction="sum").eval()
    out = model(parts["questions"], parts["targets"])
    hf = _transformers_rag(cls, model, k, eps).eval()
    texts = [q.question for q in parts["questions"]]
    ctx = build_context_inputs(texts, out.retrieval.passages, model.generator, max_context_length=64)
    b, _, lc = ctx.context_input_ids.shape
    start = torch.full((b, 1), model.generator.decoder_start_token_id)
    hf_loss = hf(
        context_input_ids=ctx.context_input_ids.view(b * k, lc),
        context_attention_mask=ctx.context_attention_mask.view(b * k, lc).long(),
        doc_scores=out.doc_scores.detach(),
        labels=torch.cat([start, out.labels], dim=1),  # transformers' labels start with the decoder start
        reduce_loss=True,
    ).loss
    torch.testing.assert_close(out.loss, hf_loss.sum(), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ generation


def test_generate_returns_answers_with_their_passages_and_posteriors(parts):
    model = make_model(parts, n_docs=2, eval_n_docs=3).eval()
    questions = parts["questions"][:3]
    answers = model.generate(questions, max_new_tokens=5)
    retrieval = model.retrieve(questions, 3)
    ctx = build_context_inputs(
        [q.question for q in questions], retrieval.passages, model.generator, max_context_length=64
    )
    reference = rag_token_generate(
        model.generator.model,
        ctx.context_input_ids,
        ctx.context_attention_mask,
        retrieval.doc_scores.detach(),
        max_new_tokens=5,
    )
    texts = model.generator.tokenizer.batch_decode(reference.sequences[:, 0], skip_special_tokens=True)
    for b, answer in enumerate(answers):
        assert answer.answer == texts[b].strip()
        assert [p.id for p in answer.passages] == [p.id for p in retrieval.passages[b]]  # eval_n_docs = 3
        np.testing.assert_allclose(
            answer.doc_priors, torch.softmax(retrieval.doc_scores[b], 0).detach(), atol=1e-6
        )
        np.testing.assert_allclose(answer.doc_posteriors, reference.doc_posteriors[b, 0], atol=1e-6)
        assert abs(sum(answer.doc_posteriors) - 1) < 1e-5
    # a test-time n_docs over any K, whatever K the model trained with
    assert [len(a.passages) for a in model.generate(questions[:1], n_docs=5, max_new_tokens=2)] == [5]


def test_closed_book_generate_equals_bart_greedy_decoding(parts):
    model = make_model(parts, mode="none").eval()
    questions = parts["questions"][:3]
    answers = model.generate(questions, max_new_tokens=6)
    gen = model.generator
    enc = gen.tokenizer([q.question for q in questions], padding=True, return_tensors="pt")
    sequences = gen.model.generate(**enc, max_new_tokens=6, num_beams=1, do_sample=False)
    expected = gen.tokenizer.batch_decode(sequences, skip_special_tokens=True)
    assert [a.answer for a in answers] == [e.strip() for e in expected]
    assert all(a.passages == [] and a.doc_posteriors == [] for a in answers)


def test_sequence_head_decodes_thoroughly_by_default(parts):
    model = make_model(
        parts, head="sequence", n_docs=2, generation={"num_beams": 2, "max_new_tokens": 4}
    ).eval()
    assert model.default_decoder() == "sequence_thorough"
    answers = model.generate(parts["questions"][:2])
    for a in answers:
        assert len(a.passages) == 2 and abs(sum(a.doc_posteriors) - 1) < 1e-5


# ------------------------------------------------------------------------------------------ errors


def test_parts_that_do_not_fit_are_refused_with_the_fix(parts):
    gen = build_tiny_bart(TINY_BERT, vocab_size=VOCAB)
    with pytest.raises(RagModelError, match="needs a DenseRetriever"):
        RagModel(gen, tiny_encoder(QueryEncoder), parts["bm25"], retriever_mode="learned")
    with pytest.raises(RagModelError, match="needs a BM25Retriever"):
        RagModel(gen, None, parts["retriever"], retriever_mode="bm25")
    with pytest.raises(RagModelError, match="384-d vectors but the index holds 32-d"):
        RagModel(gen, tiny_bert_encoder(hidden_size=384, attention_heads=6, layers=1), parts["retriever"])
    with pytest.raises(RagModelError, match="only 30 passages"):
        RagModel(gen, tiny_encoder(QueryEncoder), parts["retriever"], n_docs=31)
    with pytest.raises(RagModelError, match="head must be one of"):
        RagModel(gen, None, None, retriever_mode="none", head="tokens")
    model = RagModel(gen, None, None, retriever_mode="none")
    with pytest.raises(RagModelError, match="one target answer string per question"):
        model(["who?", "what?"], ["one"])
    with pytest.raises(RagModelError, match="not a single question"):
        model.generate("who wrote hamlet")


# ------------------------------------------------------------------------------------------ gold mode, freeze


def gold_model(parts, **kwargs) -> RagModel:
    from rag.retrieval.retriever import GoldRetriever

    generator = build_tiny_bart(TINY_BERT, vocab_size=VOCAB, d_model=32, ffn_dim=64, seed=0).eval()
    kwargs.setdefault("max_context_length", 64)
    return RagModel(
        generator, None, GoldRetriever(parts["passages"]), retriever_mode="gold", n_docs=1, **kwargs
    )


def test_gold_mode_reads_each_questions_gold_passage(parts):
    model = gold_model(parts)
    out = model(parts["questions"], parts["targets"])
    for q, row in zip(parts["questions"], out.retrieval.passages):
        assert [p.id for p in row] == [q.gold_passage_ids[0]]
    assert torch.equal(out.doc_scores, torch.zeros(8, 1))
    # with one passage and uniform scores the RAG-Token loss is the generator's own NLL on the gold context
    ctx = build_context_inputs(
        parts["questions"], out.retrieval.passages, model.generator, max_context_length=64
    )
    labels = build_labels(parts["targets"], model.generator)
    logits = model.generator(ctx.context_input_ids, ctx.context_attention_mask, labels=labels)[
        :, 0
    ]  # (B, T, V)
    mask = labels != model.generator.pad_token_id
    nll = -(logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0] * mask).sum(1).mean()
    torch.testing.assert_close(out.loss, nll)
    answers = model.generate(parts["questions"][:2])
    assert [a.passages[0].id for a in answers] == [q.gold_passage_ids[0] for q in parts["questions"][:2]]


def test_gold_mode_needs_question_records_with_gold_passages(parts):
    from rag.retrieval.errors import RetrievalInputError
    from rag.types import Question

    model = gold_model(parts)
    with pytest.raises(RagModelError, match="Question records"):
        model(["who wrote it?"], ["me"])
    with pytest.raises(RetrievalInputError, match="no gold passage"):
        model([Question("x", "who wrote it?", ("me",))], ["me"])
    with pytest.raises(RetrievalInputError, match="not in the corpus"):
        model([Question("x", "who?", ("me",), gold_passage_ids=("nq:nope",))], ["me"])
    with pytest.raises(RagModelError, match="GoldRetriever"):
        RagModel(model.generator, None, parts["bm25"], retriever_mode="gold")


def test_freeze_patterns_stop_training_what_they_match_and_typos_fail(parts):
    model = make_model(
        parts, freeze=[r"generator\.model\.model\.shared\.", r"query_encoder\.model\.embeddings\."]
    )
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "generator.model.model.shared.weight" in frozen
    assert any(n.startswith("query_encoder.model.embeddings.") for n in frozen)
    assert not any(n.startswith("generator.model.model.decoder.layers") for n in frozen)
    out = model(parts["questions"], parts["targets"])
    out.loss.backward()
    assert model.generator.model.model.shared.weight.grad is None
    with pytest.raises(RagModelError, match="matches no parameter"):
        make_model(parts, freeze=[r"generator\.model\.encoder\.layerz"])
    with pytest.raises(RagModelError, match="not a regular expression"):
        make_model(parts, freeze=["(unclosed"])
    # a query-encoder pattern is skipped for a model without one (the closed-book run of the same config)
    closed = make_model(parts, mode="none", freeze=[r"query_encoder\.model\.embeddings\."])
    assert all(p.requires_grad for p in closed.parameters())


def test_explain_gives_figure2_token_posteriors_and_the_answer_posterior_by_brute_force(parts):
    """Per-token p(z_t|x,y_t,y_<t) and per-answer p(z|x,y), each against a direct computation from the
    generator's per-passage token probabilities."""
    model = make_model(parts, n_docs=3).eval()
    questions, targets = parts["questions"][:2], parts["targets"][:2]
    explained = model.explain(questions, targets, n_docs=3)
    with torch.no_grad():
        out = model(questions, targets, n_docs=3)
    logprobs = torch.log_softmax(out.seq_logits.double(), dim=-1)  # (B, K, T, V)
    retrieval = model.retrieve(questions, 3)
    for b, ex in enumerate(explained):
        assert [p.id for p in ex.passages] == [p.id for p in retrieval.passages[b]]
        prior = torch.softmax(out.doc_scores[b].double(), 0)  # (K,)
        np.testing.assert_allclose(ex.doc_priors, prior.float(), atol=1e-6)
        labels = out.labels[b]
        n = int((labels != model.generator.pad_token_id).sum())
        assert len(ex.tokens) == n and ex.token_posteriors.shape == (n, 3)
        token_ll = torch.stack([logprobs[b, :, t, labels[t]] for t in range(n)])  # (T, K)
        for t in range(n):
            joint = prior * token_ll[t].exp()  # (K,)
            np.testing.assert_allclose(ex.token_posteriors[t], (joint / joint.sum()).float(), atol=1e-5)
        whole = prior.log() + token_ll.sum(0)  # (K,) log p(z|x) + log p(y|x,z)
        np.testing.assert_allclose(ex.doc_posteriors, torch.softmax(whole, 0).float(), atol=1e-5)
    with pytest.raises(RagModelError, match="one answer string per question"):
        model.explain(questions, ["only one"])
