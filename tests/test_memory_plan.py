"""Index memory planning: the plan against real builds, refusals that name a kind that fits, and the rag-index
hook that refuses before any embedding is done."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import rag.retrieval.memory as memory
from rag.retrieval.index import estimate_memory_bytes, make_index
from rag.retrieval.memory import IndexMemoryError, available_memory_bytes, plan_for_index, plan_index_memory

DPR = (21_015_324, 768)


@pytest.mark.parametrize(
    "kind, params",
    [
        ("flat", {}),
        ("hnsw", {"m": 16, "ef_construction": 40}),
        ("hnsw_sq8", {"m": 8, "ef_construction": 40, "train_size": 1000}),
        ("ivfpq", {"pq_m": 8, "pq_nbits": 6, "nlist": 20, "train_size": 2000}),
        ("ivfpq_refine", {"pq_m": 8, "pq_nbits": 6, "nlist": 20, "train_size": 2000, "k_factor": 4}),
    ],
)
def test_plan_matches_the_memory_of_a_real_build(kind, params):
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((3000, 32)).astype(np.float32)
    index = make_index(kind, recall_probes=0, verbose=False, **params)
    plan = plan_for_index(index, *embeds.shape, available_bytes=None)
    index.build(embeds)
    estimate = plan.estimate(kind)
    assert estimate.index_bytes == estimate_memory_bytes(kind, 3000, 32, **params)
    assert estimate.index_bytes == pytest.approx(index.memory_bytes(), rel=0.1)
    assert estimate.build_bytes > estimate.index_bytes  # a build holds blocks and samples beside the index


def test_paper_scale_figures():
    plan = plan_index_memory(*DPR, "hnsw", {"m": 512}, available_bytes=None)
    by_kind = {e.kind: e for e in plan.estimates}
    assert by_kind["flat"].index_bytes == 4 * 768 * DPR[0]  # 64.6 GB of float32 vectors
    # HNSW adds ~8M bytes of links per vector; DPR's M=512 doubles the memory of the vectors
    assert by_kind["hnsw"].params == {"M": 512} and 145e9 < by_kind["hnsw"].index_bytes < 155e9
    # SQ8 stores 1 byte per dimension instead of 4 (and 2 floats per dimension of quantiser ranges)
    assert by_kind["hnsw_sq8"].index_bytes == pytest.approx(
        by_kind["hnsw"].index_bytes - 3 * 768 * DPR[0], abs=10**4
    )
    assert by_kind["ivfpq"].index_bytes == pytest.approx(72 * DPR[0], rel=0.01)  # 64 code bytes + 8 id bytes
    assert all(e.fits is None for e in plan.estimates)
    plan.check()  # nothing is refused when the available memory is unknown


def test_refusal_names_the_kinds_that_fit():
    plan = plan_index_memory(*DPR, "hnsw", {"m": 32}, available_bytes=26 * 10**9)
    table = plan.table()
    for line in (
        "flat",
        "hnsw (M=32)",
        "hnsw_sq8 (M=32)",
        "ivfpq (pq_m=64, pq_nbits=8, nlist=4584)",
        "<- asked for",
    ):
        assert line in table
    with pytest.raises(IndexMemoryError) as err:
        plan.check()
    message = str(err.value)
    assert "hnsw (M=32) index over 21,015,324 vectors x 768 needs about 70.5 GB" in message
    assert "index=hnsw_sq8" in message and "index=ivfpq" in message and "index=flat" not in message
    # ivfpq_refine holds what ivfpq holds (its embeddings stay on disk) and ranks above it: exact scores
    assert [e.kind for e in plan.fitting_kinds()] == ["hnsw_sq8", "ivfpq_refine", "ivfpq"]
    tight = plan_index_memory(*DPR, "hnsw", {"m": 32}, available_bytes=5 * 10**9)
    with pytest.raises(IndexMemoryError, match="use index=ivfpq") as err:
        tight.check()
    assert "hnsw_sq8" not in str(err.value)
    nothing = plan_index_memory(*DPR, "ivfpq", {}, available_bytes=10**8)
    with pytest.raises(IndexMemoryError, match="no index kind fits here"):
        nothing.check()


def test_the_check_can_be_skipped_and_passes_when_it_fits(monkeypatch):
    plan = plan_index_memory(*DPR, "flat", {}, available_bytes=10**9)
    monkeypatch.setenv("RAG_INDEX_MEMORY_CHECK", "0")
    plan.check()
    monkeypatch.delenv("RAG_INDEX_MEMORY_CHECK")
    with pytest.raises(IndexMemoryError):
        plan.check()
    plan_index_memory(10_000, 384, "flat", {}, available_bytes=10**9).check()


def test_parameters_follow_the_configured_index():
    plan = plan_index_memory(1_000_000, 100, "ivfpq", {"pq_m": 64, "nlist": 500}, available_bytes=None)
    ivf = plan.estimate("ivfpq")
    assert ivf.params["pq_m"] in (50, 100) and ivf.params["nlist"] == 500  # 64 does not divide 100
    assert "does not divide 100" in plan.table()
    assert plan.estimate("hnsw").params == {"M": 32}  # HNSWIndex's default when the index is not HNSW
    with pytest.raises(ValueError, match="unknown index kind"):
        plan_index_memory(10, 8, "annoy")


def test_available_memory_is_a_real_figure():
    available = available_memory_bytes()
    total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert available is not None and 0 < available <= total


def test_rag_index_refuses_before_embedding(tmp_path, monkeypatch, capsys):
    from rag.build import ensure_index
    from rag.data.miniwiki import load_corpus
    from rag.model import tiny_bert_encoder

    passages = load_corpus()[:20]
    encoder = tiny_bert_encoder("document")
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 20_000)  # room for ivfpq-sized things only
    with pytest.raises(IndexMemoryError, match="the hnsw .* needs about"):
        ensure_index(passages, encoder, make_index("hnsw"), tmp_path / "index", tmp_path / "embeddings")
    assert not (tmp_path / "embeddings").exists() or not any((tmp_path / "embeddings").iterdir())
    assert "index memory plan for 20 vectors x 32" in capsys.readouterr().err
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 10**10)
    result = ensure_index(
        passages,
        encoder,
        make_index("flat"),
        tmp_path / "index",
        tmp_path / "embeddings",
        embed={"show_progress": False},
    )
    assert result.built and result.index.ntotal == 20
