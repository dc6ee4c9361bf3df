"""Interoperability with transformers' RAG (rag.interop, rag-convert), offline, on tiny models.

Import: a tiny random transformers RAG (a DPR question encoder on the tiny WordPiece vocabulary, a BART on the tiny
byte-level BPE, as the released models pair them) saved with RagTokenizer loads here; retrieval scores, generator
inputs, losses and answers equal transformers' own on the same documents. Export: our models (a BART with BERT's
special-token convention, a [CLS]-pooled BERT query encoder) written in transformers' format load with
RagTokenForGeneration / RagSequenceForGeneration.from_pretrained and give the same losses and answers; loading the
export back here gives the original model. The CLI goes import -> rag-evaluate -> export on the released-model
experiment. Real passages and questions come from the embedded mini-wiki.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from hydra import compose as compose_config
from hydra import initialize_config_dir
from torch import nn
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
    RagConfig,
    RagRetriever,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)
from transformers.utils import logging as hf_logging

from rag import interop
from rag.cli import convert as convert_cli
from rag.cli import evaluate as evaluate_cli
from rag.config_dir import conf_dir
from rag.data.miniwiki import load_corpus, load_questions
from rag.generation.context import build_context_inputs
from rag.generation.generator import Generator, build_tiny_bart
from rag.interop import (
    EXPORT_MANIFEST,
    ExportError,
    InteropError,
    NotARagCheckpointError,
    TokenizerMismatchError,
    export_transformers_rag,
    load_transformers_rag,
    rag_model_from_transformers,
)
from rag.model import RagModel
from rag.retrieval.encoders import DocumentEncoder, QueryEncoder
from rag.retrieval.index import FlatIndex
from rag.retrieval.retriever import BM25Retriever, DenseRetriever

FIXTURES = Path(__file__).parent / "fixtures"
TINY_BERT = FIXTURES / "tiny_bert"  # WordPiece, [PAD]=0: the question encoders' tokenizer
TINY_BART = FIXTURES / "tiny_bart"  # byte-level BPE, <s>=0 <pad>=1 </s>=2: the released-style generator's
QVOCAB = BertConfig.from_pretrained(TINY_BERT).vocab_size
BOS, PAD, EOS = 0, 1, 2
N_PASSAGES = 30

hf_logging.set_verbosity_error()


def seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def peaked(module: nn.Module, eos: int, seed: int) -> None:
    """Weights of std 0.3 and an EOS bias: a random generator then answers with varied lengths and few near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
        module.final_logits_bias[0, eos] = 2.5


def dpr_config() -> DPRConfig:
    return DPRConfig(
        vocab_size=QVOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512,
    )  # fmt: skip


def released_style_rag(cls, n_docs: int = 3):
    """A tiny transformers RAG shaped like facebook/rag-*-nq: DPR question encoder + BART, a generator prefix."""
    bart_config = BartConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(TINY_BART)), d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=512, forced_bos_token_id=BOS, forced_eos_token_id=EOS, prefix=" ",
    )  # fmt: skip
    question_encoder = seeded(lambda: DPRQuestionEncoder(dpr_config()), 0)
    generator = seeded(lambda: BartForConditionalGeneration(bart_config), 1)
    peaked(generator, EOS, seed=2)
    config = RagConfig.from_question_encoder_generator_configs(
        dpr_config(), bart_config, n_docs=n_docs, max_combined_length=512
    )
    return cls(config=config, question_encoder=question_encoder, generator=generator).eval()


def real_questions():
    return load_questions("nq_gold", "dev")[:6]


def real_passages(questions, n: int = N_PASSAGES):
    """The gold passages of ``questions`` and the first other mini-wiki passages, n in all."""
    corpus = load_corpus()
    gold = {g for q in questions for g in q.gold_passage_ids}
    keep = [p for p in corpus if p.id in gold]
    return keep + [p for p in corpus if p.id not in gold][: n - len(keep)]


def dense_retriever(encoder: DocumentEncoder, passages):
    doc_embeds = encoder.encode(([p.title for p in passages], [p.text for p in passages])).numpy()
    return DenseRetriever(FlatIndex(verbose=False).build(doc_embeds), passages, None, doc_embeds=doc_embeds)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Saved tiny transformers RAG folders (token, sequence) and a saved DPR context encoder with its index."""
    root = tmp_path_factory.mktemp("released")
    folders = {}
    for head, cls in (("token", RagTokenForGeneration), ("sequence", RagSequenceForGeneration)):
        folders[head] = root / f"rag-{head}"
        rag = released_style_rag(cls)
        if head == "token":
            # settings of the RAG model's own generation config, which transformers' RAG-Token generate uses
            rag.generation_config.update(max_length=9, no_repeat_ngram_size=2)
        rag.save_pretrained(folders[head])
        RagTokenizer(
            question_encoder=AutoTokenizer.from_pretrained(TINY_BERT),
            generator=AutoTokenizer.from_pretrained(TINY_BART),
        ).save_pretrained(folders[head])
    ctx_folder = root / "ctx-encoder"
    seeded(lambda: DPRContextEncoder(dpr_config()), 3).save_pretrained(ctx_folder)
    AutoTokenizer.from_pretrained(TINY_BERT).save_pretrained(ctx_folder)
    questions = real_questions()
    passages = real_passages(questions)
    ctx_encoder = DocumentEncoder.from_pretrained(ctx_folder)
    return SimpleNamespace(
        folders=folders,
        ctx_folder=ctx_folder,
        questions=questions,
        texts=[q.question for q in questions],
        targets=[q.answers[0] for q in questions],
        passages=passages,
        retriever=dense_retriever(ctx_encoder, passages),
    )


def transformers_contexts(config, generator_tokenizer, texts, passages, n_docs: int):
    """transformers' RagRetriever.postprocess_docs (its code) on the given passages, with the config's separators,
    generator prefix and max_combined_length."""
    retriever = SimpleNamespace(config=config, generator_tokenizer=generator_tokenizer)
    docs = [{"title": [p.title for p in ps], "text": [p.text for p in ps]} for ps in passages]
    prefix = getattr(config.generator, "prefix", None)
    ids, mask = RagRetriever.postprocess_docs(retriever, docs, texts, prefix, n_docs, "pt")
    length = int(mask.sum(1).max())  # it pads to max_combined_length: keep the batch's longest
    return ids[:, :length], mask[:, :length]  # (B * K, Lc)


def decoded(tokenizer, sequences) -> list[str]:
    return [s.strip() for s in tokenizer.batch_decode(sequences, skip_special_tokens=True)]


def with_start(labels: torch.Tensor, start: int) -> torch.Tensor:
    """transformers' RAG labels begin with the decoder start token; ours do not."""
    return torch.cat([torch.full((labels.shape[0], 1), start), labels], dim=1)


# ------------------------------------------------------------------------------------------------ import


def test_released_rag_token_loads_and_matches_transformers_end_to_end(released):
    """Retrieval, generator inputs, loss and greedy answers of the loaded model equal transformers' on the same
    checkpoint: its question encoder against the same document vectors, its RagRetriever formatting, its forward
    and its generate with the checkpoint's own generation settings."""
    folder = released.folders["token"]
    model = rag_model_from_transformers(folder, released.retriever, reduction="sum")
    assert (model.head, model.n_docs, model.context_prefix, model.max_context_length) == (
        "token",
        3,
        " ",
        512,
    )
    hf = RagTokenForGeneration.from_pretrained(folder).eval()
    tok = RagTokenizer.from_pretrained(folder)
    b, k = len(released.texts), model.n_docs

    out = model(released.questions, released.targets)
    # retrieval: transformers' question encoder (DPR pooler_output) against the stored vectors, brute force
    enc = tok.question_encoder(released.texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        q = hf.question_encoder(**enc)[0]  # (B, D)
    scores = q.numpy() @ released.retriever.doc_embeds.T  # (B, N)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(out.retrieval.doc_ids.numpy(), ids)
    hf_doc_scores = torch.from_numpy(np.take_along_axis(scores, ids, 1))  # (B, K)
    torch.testing.assert_close(out.doc_scores.detach(), hf_doc_scores, rtol=1e-5, atol=1e-5)

    # generator inputs: title / text // question with the checkpoint's prefix, token for token
    ctx_ids, ctx_mask = transformers_contexts(
        hf.config, tok.generator, released.texts, out.retrieval.passages, k
    )
    ours = build_context_inputs(
        released.texts, out.retrieval.passages, model.generator, prefix=" ", max_context_length=512
    )
    assert ours.context_input_ids.view(b * k, -1)[ours.context_attention_mask.view(b * k, -1)].tolist() == (
        ctx_ids[ctx_mask.bool()].tolist()
    )
    assert tok.generator.decode(ctx_ids[0]).startswith("<s> ")  # the prefix is there

    with torch.no_grad():
        hf_loss = hf(
            context_input_ids=ctx_ids,
            context_attention_mask=ctx_mask,
            doc_scores=hf_doc_scores,
            labels=with_start(out.labels, model.generator.decoder_start_token_id),
            reduce_loss=True,
        ).loss
    torch.testing.assert_close(out.loss.detach(), hf_loss, rtol=1e-5, atol=1e-4)

    answers = [a.answer for a in model.generate(released.questions)]
    with torch.no_grad():
        expected = decoded(
            tok,
            hf.generate(context_input_ids=ctx_ids, context_attention_mask=ctx_mask, doc_scores=hf_doc_scores),
        )
    assert answers == expected
    assert len(set(answers)) > 1  # not a degenerate case
    assert model.generator.model.generation_config.max_length == 9  # the checkpoint's settings came along


def equal_length_batch(
    tokenizer, prefix: str, n_questions: int = 2, n_passages: int = 3, max_length: int = 500
):
    """Questions and passages whose ``title / text // question`` inputs all tokenize to one length, so that the
    contexts carry no padding (transformers' RAG-Sequence generate ignores the attention mask)."""
    questions = load_questions("nq_gold", "dev")
    by_length: dict[int, list] = {}
    for q in questions:
        by_length.setdefault(len(tokenizer(" // " + q.question)["input_ids"]), []).append(q)
    chosen = next(qs[:n_questions] for qs in by_length.values() if len(qs) >= n_questions)
    lengths: dict[int, list] = {}
    for p in load_corpus()[:2000]:
        one = build_context_inputs(
            [chosen[0].question], [[p]], tokenizer, prefix=prefix, max_context_length=10**6
        )
        n = one.context_input_ids.shape[-1]
        if n > max_length:
            continue
        lengths.setdefault(n, []).append(p)
        if len(lengths[n]) == n_passages:
            passages = lengths[n]
            ctx = build_context_inputs(
                [q.question for q in chosen],
                [passages] * len(chosen),
                tokenizer,
                prefix=prefix,
                max_context_length=10**6,
            )
            if ctx.context_attention_mask.all():
                return chosen, passages
            lengths[n] = []
    raise AssertionError("no equal-length batch in the mini-wiki")


def test_released_rag_sequence_loads_and_matches_transformers(released):
    """RAG-Sequence: the same loss, and the same thorough-decoding answers on contexts without padding."""
    folder = released.folders["sequence"]
    hf = RagSequenceForGeneration.from_pretrained(folder).eval()
    tok = RagTokenizer.from_pretrained(folder)
    model = rag_model_from_transformers(folder, released.retriever, reduction="sum")
    assert model.head == "sequence" and model.default_decoder() == "sequence_thorough"
    out = model(released.questions, released.targets)
    k = model.n_docs
    ctx_ids, ctx_mask = transformers_contexts(
        hf.config, tok.generator, released.texts, out.retrieval.passages, k
    )
    with torch.no_grad():
        hf_loss = hf(
            context_input_ids=ctx_ids,
            context_attention_mask=ctx_mask,
            doc_scores=out.doc_scores.detach(),
            labels=with_start(out.labels, model.generator.decoder_start_token_id),
            reduce_loss=True,
        ).loss
    torch.testing.assert_close(out.loss.detach(), hf_loss, rtol=1e-5, atol=1e-4)

    questions, passages = equal_length_batch(model.generator.tokenizer, model.context_prefix)
    ctx_encoder = DocumentEncoder.from_pretrained(released.ctx_folder)
    model.retriever = dense_retriever(ctx_encoder, passages)
    settings = {"num_beams": 2, "max_new_tokens": 8, "min_length": 3}
    answers = model.generate(questions, n_docs=3, **settings)
    texts = [q.question for q in questions]
    ctx_ids, ctx_mask = transformers_contexts(
        hf.config, tok.generator, texts, [a.passages for a in answers], 3
    )
    assert ctx_mask.all()
    doc_scores = torch.tensor([a.doc_scores for a in answers])
    with torch.no_grad():
        expected = decoded(
            tok,
            hf.generate(
                context_input_ids=ctx_ids,
                context_attention_mask=ctx_mask,
                doc_scores=doc_scores,
                n_docs=3,
                **settings,
            ),
        )
    assert [a.answer for a in answers] == expected and any(expected)


def test_a_bare_rag_model_folder_loads_with_the_token_head_by_default(released, tmp_path):
    folder = tmp_path / "bare"
    transformers.RagModel.from_pretrained(released.folders["sequence"]).save_pretrained(folder)
    RagTokenizer.from_pretrained(released.folders["sequence"]).save_pretrained(folder)
    loaded = load_transformers_rag(folder)
    assert (loaded.architecture, loaded.head, loaded.model_kwargs()["head"]) == ("RagModel", None, "token")
    reference = RagSequenceForGeneration.from_pretrained(released.folders["sequence"])
    for ours, theirs in (
        (loaded.generator.model, reference.generator),
        (loaded.query_encoder.model, reference.question_encoder),
    ):
        expected = theirs.state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())


def test_hydra_loaders_take_both_parts_from_one_load(released, monkeypatch):
    calls = []
    load = interop.load_transformers_rag
    monkeypatch.setattr(interop, "load_transformers_rag", lambda *a, **k: calls.append(a) or load(*a, **k))
    monkeypatch.setattr(interop, "_waiting", {})
    folder = str(released.folders["token"])
    generator = interop.load_rag_generator(folder)
    query_encoder = interop.load_rag_query_encoder(folder, max_length=1000)
    assert len(calls) == 1 and query_encoder.max_length == 512  # capped at the encoder's positions
    assert (
        interop.load_rag_generator(folder) is not generator and len(calls) == 2
    )  # a second model loads anew


# ------------------------------------------------------------------------------------------------ export


def our_query_encoder(pooling: str = "cls", seed: int = 4) -> QueryEncoder:
    bert = seeded(
        lambda: BertModel(BertConfig.from_pretrained(TINY_BERT), add_pooling_layer=False).eval(), seed
    )
    tokenizer = AutoTokenizer.from_pretrained(TINY_BERT)
    return QueryEncoder(bert, tokenizer, pooling=pooling, name=f"tiny-{pooling}", max_length=128)


def our_generator() -> Generator:
    """BERT's special-token convention ([CLS] starts the decoder, [SEP] ends answers, [PAD]=0), as bart_from_bert."""
    generator = build_tiny_bart(TINY_BERT, vocab_size=QVOCAB, d_model=32, ffn_dim=64, seed=6).eval()
    peaked(generator.model, generator.eos_token_id, seed=7)
    return generator


@pytest.fixture(scope="module")
def ours():
    questions = real_questions()
    passages = real_passages(questions)
    bert = seeded(lambda: BertModel(BertConfig.from_pretrained(TINY_BERT), add_pooling_layer=False).eval(), 5)
    doc_encoder = DocumentEncoder(
        bert, AutoTokenizer.from_pretrained(TINY_BERT), pooling="cls", max_length=128
    )
    return SimpleNamespace(
        questions=questions,
        texts=[q.question for q in questions],
        targets=[q.answers[0] for q in questions],
        passages=passages,
        doc_encoder=doc_encoder,
        retriever=dense_retriever(doc_encoder, passages),
    )


def our_model(ours, head: str, **kwargs) -> RagModel:
    kwargs.setdefault("query_encoder", our_query_encoder())
    return RagModel(
        our_generator(), retriever=ours.retriever, head=head, n_docs=3, max_context_length=96, reduction="sum",
        **kwargs,
    ).eval()  # fmt: skip


def transformers_loss(hf, model: RagModel, out, texts) -> torch.Tensor:
    """transformers' loss on the documents our model retrieved, formatted by our context builder."""
    ctx = build_context_inputs(texts, out.retrieval.passages, model.generator, max_context_length=96)
    b, k, lc = ctx.context_input_ids.shape
    with torch.no_grad():
        return hf(
            context_input_ids=ctx.context_input_ids.view(b * k, lc),
            context_attention_mask=ctx.context_attention_mask.view(b * k, lc).long(),
            doc_scores=out.doc_scores.detach(),
            labels=with_start(out.labels, model.generator.decoder_start_token_id),
            reduce_loss=True,
        ).loss


def test_exported_rag_token_loads_in_transformers_with_the_same_vectors_losses_and_answers(ours, tmp_path):
    model = our_model(ours, "token", generation={"max_new_tokens": 6})
    path = export_transformers_rag(model, tmp_path / "export")
    hf = RagTokenForGeneration.from_pretrained(path).eval()
    tok = RagTokenizer.from_pretrained(path)
    # the question vectors transformers' RAG retrieves with are ours ([CLS] of the same BERT weights)
    enc = tok.question_encoder(ours.texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            hf.question_encoder(**enc)[0], model.embed_questions(ours.texts), atol=1e-5, rtol=1e-5
        )
    out = model(ours.questions, ours.targets)
    torch.testing.assert_close(
        out.loss.detach(), transformers_loss(hf, model, out, ours.texts), rtol=1e-5, atol=1e-4
    )

    # transformers' generate with no settings: the exported generation config carries ours
    answers = model.generate(ours.questions)
    ctx = build_context_inputs(
        ours.texts, [a.passages for a in answers], model.generator, max_context_length=96
    )
    b, k, lc = ctx.context_input_ids.shape
    with torch.no_grad():
        sequences = hf.generate(
            context_input_ids=ctx.context_input_ids.view(b * k, lc),
            context_attention_mask=ctx.context_attention_mask.view(b * k, lc).long(),
            doc_scores=torch.tensor([a.doc_scores for a in answers]),
        )
    assert [a.answer for a in answers] == decoded(tok, sequences)
    assert len({a.answer for a in answers}) > 1
    manifest = json.loads((path / EXPORT_MANIFEST).read_text())
    assert (manifest["head"], manifest["n_docs"], manifest["generation"]) == (
        "token",
        3,
        {"num_beams": 1, "max_length": 7},
    )
    assert manifest["question_encoder"]["exported_as"] == "bert, [CLS] pooled"

    # and back: the export loads here as the model it came from
    back = rag_model_from_transformers(path, ours.retriever, reduction="sum")
    assert (back.head, back.n_docs, back.max_context_length, back.context_prefix) == ("token", 3, 96, "")
    original = model.generator.model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in back.generator.model.state_dict().items())
    back_out = back(ours.questions, ours.targets)
    np.testing.assert_array_equal(back_out.retrieval.doc_ids, out.retrieval.doc_ids)
    torch.testing.assert_close(back_out.loss, out.loss, rtol=1e-6, atol=1e-5)
    assert [a.answer for a in back.generate(ours.questions)] == [a.answer for a in answers]


def test_exported_rag_sequence_loads_in_transformers_with_the_same_losses_and_answers(ours, tmp_path):
    model = our_model(ours, "sequence", generation={"num_beams": 2, "max_new_tokens": 6})
    path = export_transformers_rag(model, tmp_path / "export")
    hf = RagSequenceForGeneration.from_pretrained(path).eval()
    tok = RagTokenizer.from_pretrained(path)
    out = model(ours.questions, ours.targets)
    torch.testing.assert_close(
        out.loss.detach(), transformers_loss(hf, model, out, ours.texts), rtol=1e-5, atol=1e-4
    )

    # RagSequenceForGeneration keeps no generation settings: the manifest says what to pass
    settings = json.loads((path / EXPORT_MANIFEST).read_text())["generation"]
    assert settings == {"num_beams": 2, "max_length": 7}
    questions, passages = equal_length_batch(model.generator.tokenizer, "")
    model.retriever = dense_retriever(ours.doc_encoder, passages)
    model.max_context_length = 512  # no passage cut either: every input keeps the one length
    answers = model.generate(questions)
    ctx = build_context_inputs(
        [q.question for q in questions],
        [a.passages for a in answers],
        model.generator,
        max_context_length=512,
    )
    assert ctx.context_attention_mask.all()
    b, k, lc = ctx.context_input_ids.shape
    with torch.no_grad():
        sequences = hf.generate(
            context_input_ids=ctx.context_input_ids.view(b * k, lc),
            context_attention_mask=ctx.context_attention_mask.view(b * k, lc).long(),
            doc_scores=torch.tensor([a.doc_scores for a in answers]),
            **settings,
        )
    assert [a.answer for a in answers] == decoded(tok, sequences) and any(a.answer for a in answers)
    back = rag_model_from_transformers(path, model.retriever, max_context_length=512)
    assert back.head == "sequence" and [a.answer for a in back.generate(questions, **settings)] == [
        a.answer for a in answers
    ]


def test_mean_pooled_query_encoder_is_refused_unless_asked_and_the_generator_still_exports(ours, tmp_path):
    model = our_model(ours, "token", query_encoder=our_query_encoder("mean"))
    with pytest.raises(ExportError, match="mean pooling, but transformers' RAG embeds questions with DPR's"):
        export_transformers_rag(model, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    path = export_transformers_rag(model, tmp_path / "forced", allow_pooling_mismatch=True)
    hf = RagTokenForGeneration.from_pretrained(path).eval()
    out = model(ours.questions, ours.targets)
    torch.testing.assert_close(
        out.loss.detach(), transformers_loss(hf, model, out, ours.texts), rtol=1e-5, atol=1e-4
    )
    assert (
        "allow_pooling_mismatch"
        in json.loads((path / EXPORT_MANIFEST).read_text())["question_encoder"]["exported_as"]
    )


def test_model_without_query_encoder_exports_with_a_named_dpr_encoder(ours, tmp_path):
    model = RagModel(
        our_generator(), None, BM25Retriever.from_passages(ours.passages), retriever_mode="bm25"
    ).eval()
    with pytest.raises(ExportError, match="no query encoder .* pass question_encoder="):
        export_transformers_rag(model, tmp_path / "x")
    dpr_folder = tmp_path / "dpr"
    dpr = seeded(lambda: DPRQuestionEncoder(dpr_config()), 8).eval()
    dpr.save_pretrained(dpr_folder)
    AutoTokenizer.from_pretrained(TINY_BERT).save_pretrained(dpr_folder)
    path = export_transformers_rag(model, tmp_path / "x", question_encoder=str(dpr_folder))
    hf = RagTokenForGeneration.from_pretrained(path)
    assert all(torch.equal(v, dpr.state_dict()[k]) for k, v in hf.question_encoder.state_dict().items())
    original = model.generator.model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in hf.generator.state_dict().items())


# ------------------------------------------------------------------------------------------------ bad input


def test_folders_that_are_not_rag_checkpoints_are_refused_with_the_fix(released, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotARagCheckpointError, match="holds no config.json"):
        load_transformers_rag(empty)
    with pytest.raises(NotARagCheckpointError, match="does not exist"):
        load_transformers_rag(tmp_path / "missing")
    bart = tmp_path / "bart"
    our_generator().save_pretrained(bart)
    with pytest.raises(NotARagCheckpointError, match="is a 'bart' checkpoint, not a transformers RAG one"):
        load_transformers_rag(bart)
    with pytest.raises(NotARagCheckpointError, match="HF_HUB_OFFLINE|hub cache"):
        load_transformers_rag("no-such-org/no-such-rag-model")
    no_tokenizers = tmp_path / "no_tokenizers"
    RagTokenForGeneration.from_pretrained(released.folders["token"]).save_pretrained(no_tokenizers)
    with pytest.raises(
        NotARagCheckpointError,
        match=r"no question encoder tokenizer in question_encoder_tokenizer/.*RagTokenizer",
    ):
        load_transformers_rag(no_tokenizers)


def test_mismatched_tokenizers_are_refused_before_the_weights_load(released, monkeypatch):
    folder = released.folders["token"]
    load = RagTokenForGeneration.from_pretrained

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were read before the tokenizers were checked")

    monkeypatch.setattr(RagTokenForGeneration, "from_pretrained", no_weights)
    with pytest.raises(TokenizerMismatchError, match="pads with id 0 but the generator with id 1"):
        load_transformers_rag(folder, generator_tokenizer=TINY_BERT)
    with pytest.raises(
        TokenizerMismatchError, match="has 700 tokens but the DPR question encoder's vocabulary only 199"
    ):
        load_transformers_rag(folder, question_encoder_tokenizer=TINY_BART)
    with pytest.raises(InteropError, match="cannot load the generator tokenizer"):
        load_transformers_rag(folder, generator_tokenizer=folder / "missing")
    # the checkpoint's own tokenizers pass the same checks
    monkeypatch.setattr(RagTokenForGeneration, "from_pretrained", load)
    assert load_transformers_rag(folder).generator.pad_token_id == PAD


# ------------------------------------------------------------------------------------------------ CLI


def compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose_config(name, overrides)


def test_cli_import_evaluate_export_round_trip_on_the_released_experiment(released, tmp_path):
    """rag-convert import on experiment=nq_rag_token_released (tiny checkpoint and corpus) -> rag-evaluate with the
    paper's K=15 greedy decoding, every answer equal to transformers' on the passages it read -> rag-convert export
    gives back the checkpoint's weights."""
    folder = released.folders["token"]
    ckpt = tmp_path / "released.ckpt"
    # rag-evaluate keeps the stored cache dir only if it exists (else it falls back to ~/.cache)
    (tmp_path / "cache").mkdir()
    train_overrides = [
        "experiment=nq_rag_token_released",
        f"rag_checkpoint={folder}",
        f"doc_encoder.model_name_or_path={released.ctx_folder}",
        "trainer=cpu",
        "index=flat",
        "~index.ef_search",
        "++index.verbose=false",
        "corpus=miniwiki",
        "corpus.name=first48",
        "corpus.passages._target_=rag.data.datamodule.corpus_slice",
        "++corpus.passages.passages={_target_: rag.data.miniwiki.load_corpus}",
        "++corpus.passages.limit=48",
        "embed.show_progress=false",
        "model.max_context_length=512",  # the tiny checkpoint's max_combined_length: no input is cut
        *[f"data.{s}.nq.path={FIXTURES / 'data' / 'NQ-open.dev.jsonl'}" for s in ("train", "val", "test")],
        f"cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'out'}",
    ]
    report = convert_cli.run_import(compose("convert_import", [*train_overrides, f"out={ckpt}"]))
    assert (
        report["architecture"] == "RagTokenForGeneration" and ckpt.stat().st_size < 100_000
    )  # no weights inside

    out = tmp_path / "eval"
    result = evaluate_cli.run(compose("evaluate", [f"ckpt_path={ckpt}", f"output_dir={out}", "threads=1"]))
    assert (result["n_docs"], result["decoder"], result["generation"]["num_beams"]) == (15, "token_greedy", 1)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 3  # the fixture's three NQ-open dev questions
    hf = RagTokenForGeneration.from_pretrained(folder).eval()
    tok = RagTokenizer.from_pretrained(folder)
    passages = [[SimpleNamespace(title=p["title"], text=p["text"]) for p in r["passages"]] for r in records]
    ctx_ids, ctx_mask = transformers_contexts(
        hf.config, tok.generator, [r["question"] for r in records], passages, 15
    )
    with torch.no_grad():
        sequences = hf.generate(
            context_input_ids=ctx_ids,
            context_attention_mask=ctx_mask,
            doc_scores=torch.tensor([[p["doc_score"] for p in r["passages"]] for r in records]),
            n_docs=15,
            max_length=51,
        )
    assert [r["prediction"] for r in records] == decoded(tok, sequences) and any(
        r["prediction"] for r in records
    )

    exported = tmp_path / "exported"
    convert_cli.run_export(compose("convert_export", [f"ckpt_path={ckpt}", f"out={exported}"]))
    again = RagTokenForGeneration.from_pretrained(exported)
    assert again.config.n_docs == 15 and again.generation_config.max_length == 51
    reference = hf.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in again.state_dict().items())


def test_cli_refuses_an_import_of_a_model_that_is_not_a_rag_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        sys, "argv", ["rag-convert", "import", "experiment=smoke", f"out={tmp_path / 'x.ckpt'}"]
    )
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main()
    assert exit_info.value.code == 1
    assert "writes checkpoints of transformers RAG models" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["rag-convert", "both"])
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main()
    assert exit_info.value.code == 2 and "usage: rag-convert import" in capsys.readouterr().err
