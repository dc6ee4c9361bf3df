"""Dense and BM25 retrieval against brute-force search, gradients through doc_scores, and clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from rag.retrieval.bm25 import BM25Index
from rag.retrieval.embed import corpus_checksum, embed_corpus, open_embeddings
from rag.retrieval.encoders import load_document_encoder, load_query_encoder
from rag.retrieval.errors import IndexMismatchError, RetrievalError, RetrievalInputError
from rag.retrieval.index import FlatIndex, HNSWIndex, HNSWSQ8Index, IndexManifest
from rag.retrieval.retriever import BM25Retriever, DenseRetriever, write_index_source
from rag.types import Passage

TINY = Path(__file__).parent / "fixtures" / "tiny_bert"
TOPICS = ["paris france", "nile egypt", "berlin germany", "thames london", "rome italy"]
PASSAGES = [
    Passage(
        f"p{i}",
        TOPICS[i % 5].split()[0],
        f"the {TOPICS[i % 5]} city river {' '.join(['one', 'two'][: i % 3])}",
    )
    for i in range(20)
]
QUESTIONS = ["what river is in paris", "who was king of egypt", "the largest city of germany"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(TINY)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def built(tiny_dir, tmp_path_factory):
    """The tiny corpus embedded by the tiny doc encoder, an exact index over it, saved with its manifest."""
    doc_encoder = load_document_encoder(str(tiny_dir), pooling="mean")
    root = tmp_path_factory.mktemp("index")
    embed_corpus(doc_encoder, PASSAGES, root / "embeds", show_progress=False)
    embeds = open_embeddings(root / "embeds")
    index = FlatIndex(verbose=False).build(embeds)
    manifest = IndexManifest(
        encoder_name=doc_encoder.name,
        encoder_checksum=doc_encoder.weights_checksum(),
        corpus_checksum=corpus_checksum(PASSAGES),
    )
    index.save(root / "flat", manifest)
    write_index_source(root / "flat", embeddings_dir=str(root / "embeds"))
    return {"dir": root / "flat", "embeds": np.asarray(embeds), "index": index, "doc_encoder": doc_encoder}


def query_encoder(tiny_dir):
    return load_query_encoder(str(tiny_dir), pooling="mean")


def brute_force(question_embeds: np.ndarray, embeds: np.ndarray, k: int):
    scores = question_embeds @ embeds.T  # (B, N)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, 1), ids


def test_dense_retrieve_equals_brute_force(tiny_dir, built):
    encoder = query_encoder(tiny_dir).eval()
    retriever = DenseRetriever.from_directory(built["dir"], PASSAGES, encoder)
    with torch.no_grad():
        out = retriever.retrieve(QUESTIONS, n_docs=4)
        q = encoder.encode(QUESTIONS).numpy()
    ref_scores, ref_ids = brute_force(q, built["embeds"], 4)
    np.testing.assert_array_equal(out.doc_ids.numpy(), ref_ids)
    np.testing.assert_allclose(out.doc_scores.numpy(), ref_scores, rtol=1e-5, atol=1e-5)
    assert out.retrieved_doc_embeds.shape == (3, 4, 32)
    np.testing.assert_allclose(out.retrieved_doc_embeds.numpy(), built["embeds"][ref_ids], atol=1e-6)
    np.testing.assert_allclose(out.question_embeds.numpy(), q, atol=1e-6)
    assert [[p.id for p in row] for row in out.passages] == [[f"p{i}" for i in row] for row in ref_ids]


def test_doc_scores_carry_the_gradient_to_the_query_encoder(tiny_dir, built):
    encoder = query_encoder(tiny_dir).train()
    retriever = DenseRetriever.from_directory(built["dir"], PASSAGES, encoder)
    out = retriever.retrieve(QUESTIONS, n_docs=3)
    assert out.doc_scores.requires_grad and not out.retrieved_doc_embeds.requires_grad
    recomputed = torch.einsum("bd,bkd->bk", out.question_embeds, out.retrieved_doc_embeds)
    torch.testing.assert_close(out.doc_scores, recomputed)
    torch.log_softmax(out.doc_scores, dim=1)[:, 0].sum().backward()
    grad = encoder.model.encoder.layer[1].output.dense.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_retrieve_by_embeds_with_planted_vectors_and_approximate_indexes():
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((300, 16)).astype(np.float32)
    passages = [Passage(f"d{i}", f"t{i}", f"text {i}") for i in range(300)]
    question_embeds = torch.from_numpy(
        embeds[[5, 17, 230]] + 0.05 * rng.standard_normal((3, 16)).astype(np.float32)
    )
    ref_scores, ref_ids = brute_force(question_embeds.numpy(), embeds, 5)
    assert list(ref_ids[:, 0]) == [5, 17, 230]  # the planted rows are the nearest
    for index in (
        HNSWIndex(m=8, verbose=False, recall_probes=0),
        HNSWSQ8Index(m=8, verbose=False, recall_probes=0),
    ):
        index.build(embeds)
        out = DenseRetriever(index, passages, doc_embeds=embeds).retrieve_by_embeds(question_embeds, 5)
        np.testing.assert_array_equal(out.doc_ids.numpy()[:, 0], [5, 17, 230])
        # scores are exact inner products with the stored vectors, best first, even behind 8-bit codes
        got_ids = out.doc_ids.numpy()
        np.testing.assert_allclose(
            out.doc_scores.numpy(),
            np.einsum("bd,bkd->bk", question_embeds.numpy(), embeds[got_ids]),
            rtol=1e-5,
        )
        assert (np.diff(out.doc_scores.numpy(), axis=1) <= 0).all()
        assert [p.id for p in out.passages[2]] == [f"d{i}" for i in got_ids[2]]
    # without stored embeddings the vectors come from the index itself
    exact = FlatIndex(verbose=False).build(embeds)
    out = DenseRetriever(exact, passages).retrieve_by_embeds(question_embeds, 5)
    np.testing.assert_array_equal(out.doc_ids.numpy(), ref_ids)
    np.testing.assert_allclose(out.doc_scores.numpy(), ref_scores, rtol=1e-5)


def test_dense_errors_name_the_problem(tiny_dir, built, tmp_path):
    encoder = query_encoder(tiny_dir)
    retriever = DenseRetriever.from_directory(built["dir"], PASSAGES, encoder)
    with pytest.raises(RetrievalInputError, match="question 1 is empty"):
        retriever.retrieve(["paris", " "], 2)
    with pytest.raises(RetrievalInputError, match="single string"):
        retriever.retrieve("paris", 2)
    with pytest.raises(RetrievalInputError, match="n_docs=21 but the corpus has 20 passages"):
        retriever.retrieve(["paris"], 21)
    with pytest.raises(RetrievalInputError, match="16-d but the index holds 32-d"):
        retriever.retrieve_by_embeds(torch.zeros(2, 16), 2)

    narrow = FlatIndex(verbose=False).build(np.eye(20, 16, dtype=np.float32))
    with pytest.raises(RetrievalInputError, match="makes 32-d vectors but the index holds 16-d"):
        DenseRetriever(narrow, PASSAGES, encoder)
    with pytest.raises(RetrievalInputError, match="holds 20 passages but 19"):
        DenseRetriever(built["index"], PASSAGES[:19], encoder)

    other_corpus = [*PASSAGES[:-1], Passage("p19", "rome", "another text")]
    with pytest.raises(IndexMismatchError, match="corpus_checksum") as err:
        DenseRetriever.from_directory(built["dir"], other_corpus, encoder)
    assert "corpus_checksum" in err.value.differences
    with pytest.raises(IndexMismatchError, match="encoder_checksum"):
        DenseRetriever.from_directory(built["dir"], PASSAGES, encoder, doc_encoder_checksum="0" * 64)
    with pytest.raises(IndexMismatchError, match="encoder_name"):
        DenseRetriever.from_directory(built["dir"], PASSAGES, encoder, doc_encoder_name="dpr-ctx_encoder")

    # embeddings of another encoder next to this index are refused, not silently mixed in
    other = load_document_encoder(str(tiny_dir), pooling="mean")
    with torch.no_grad():
        other.model.embeddings.word_embeddings.weight.mul_(2)
    embed_corpus(other, PASSAGES, tmp_path / "other", show_progress=False)
    with pytest.raises(IndexMismatchError, match="rebuild both"):
        DenseRetriever.from_directory(built["dir"], PASSAGES, encoder, embeddings_dir=tmp_path / "other")


def test_missing_neighbours_are_an_error_not_a_wrong_passage():
    class ShortIndex(FlatIndex):
        def _search(self, queries, n_docs):
            scores, ids = super()._search(queries, n_docs)
            ids[:, -1] = -1  # what faiss returns when the graph search finds too few
            return scores, ids

    embeds = np.eye(6, 4, dtype=np.float32)
    retriever = DenseRetriever(
        ShortIndex(verbose=False).build(embeds), [Passage(str(i), "", "x") for i in range(6)]
    )
    with pytest.raises(RetrievalError, match="fewer than n_docs=3"):
        retriever.retrieve_by_embeds(torch.ones(1, 4), 3)


def test_bm25_retriever(tmp_path):
    retriever = BM25Retriever.from_passages(PASSAGES, index_dir=tmp_path / "bm25")
    out = retriever.retrieve(QUESTIONS, n_docs=5)
    scores, ids = BM25Index().build(PASSAGES).search(QUESTIONS, 5)
    np.testing.assert_array_equal(out.doc_ids.numpy(), ids)
    np.testing.assert_allclose(out.doc_scores.numpy(), scores)
    assert out.doc_scores.dtype == torch.float32 and out.retrieved_doc_embeds is None
    assert all("paris" in p.text for p in out.passages[0][:4])
    reloaded = BM25Retriever.from_passages(PASSAGES, index_dir=tmp_path / "bm25")
    np.testing.assert_array_equal(reloaded.retrieve(QUESTIONS, 5).doc_ids.numpy(), ids)
    with pytest.raises(IndexMismatchError, match="another corpus"):
        BM25Retriever.from_passages(PASSAGES[:10], index_dir=tmp_path / "bm25")
    with pytest.raises(RetrievalInputError, match="not by question embeddings"):
        retriever.retrieve_by_embeds(torch.zeros(1, 4), 1)
    with pytest.raises(RetrievalInputError, match="question 0 is empty"):
        retriever.retrieve([""], 1)
    with pytest.raises(RetrievalInputError, match="n_docs=0"):
        retriever.retrieve(["paris"], 0)


@pytest.mark.gpu
def test_embedding_and_retrieval_on_cuda(tiny_dir, built, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    doc_encoder = load_document_encoder(str(tiny_dir), pooling="mean").to("cuda")
    embed_corpus(doc_encoder, PASSAGES, tmp_path / "cuda", show_progress=False)
    np.testing.assert_allclose(open_embeddings(tmp_path / "cuda"), built["embeds"], atol=1e-4)

    with torch.no_grad():
        on_gpu = DenseRetriever.from_directory(
            built["dir"], PASSAGES, query_encoder(tiny_dir).to("cuda").eval()
        )
        out = on_gpu.retrieve(QUESTIONS, n_docs=4)
        ref = DenseRetriever.from_directory(built["dir"], PASSAGES, query_encoder(tiny_dir).eval()).retrieve(
            QUESTIONS, 4
        )
    assert out.doc_scores.is_cuda and out.retrieved_doc_embeds.is_cuda and out.doc_ids.is_cuda
    np.testing.assert_array_equal(out.doc_ids.cpu().numpy(), ref.doc_ids.numpy())
    np.testing.assert_allclose(out.doc_scores.cpu().numpy(), ref.doc_scores.numpy(), atol=1e-4)


def test_gold_retriever_returns_gold_passages_and_crops_a_window_around_the_answer():
    from rag.retrieval.retriever import GoldRetriever
    from rag.types import Passage, Question

    words = [f"w{i}" for i in range(100)]
    words[70:72] = ["Rollo", "Ragnvaldsson"]
    passages = [Passage("a", "A", " ".join(words)), Passage("b", "B", "short text here")]
    q = Question("q", "who led them?", ("Rollo Ragnvaldsson",), gold_passage_ids=("a",))
    q2 = Question("q2", "what?", ("nowhere",), gold_passage_ids=("b", "a"))
    whole = GoldRetriever(passages).retrieve([q, q2], 2)
    assert [[p.id for p in row] for row in whole.passages] == [["a", "a"], ["b", "a"]]
    assert whole.doc_ids.tolist() == [[0, 0], [1, 0]] and whole.doc_scores.abs().sum() == 0
    cropped = GoldRetriever(passages, window_words=10).retrieve([q, q2], 1)
    text = cropped.passages[0][0].text
    assert len(text.split()) == 10 and "Rollo Ragnvaldsson" in text and text in passages[0].text
    assert cropped.passages[1][0].text == "short text here"  # shorter than the window: whole
    # the offset is a function of the question id: the same every time
    assert GoldRetriever(passages, window_words=10).retrieve([q], 1).passages[0][0].text == text
    # no answer in the passage: its first words
    q3 = Question("q3", "what?", ("absent",), gold_passage_ids=("a",))
    assert GoldRetriever(passages, window_words=5).retrieve([q3], 1).passages[0][0].text == "w0 w1 w2 w3 w4"
