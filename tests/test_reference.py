"""The shipped reference models' storage (rag.reference) and the rag-reference main job's machinery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rag.reference import (
    REFERENCE_DIR,
    ReferenceModelError,
    check_reference,
    load_encoder_delta,
    save_encoder_delta,
    write_manifest,
)
from rag.retrieval.encoders import load_query_encoder

TINY_BERT_CONFIG = Path(__file__).parent / "fixtures" / "tiny_bert"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """The fixture's 2-layer BERT config and tokenizer with seeded random weights, saved as a checkpoint."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(TINY_BERT_CONFIG), add_pooling_layer=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_BERT_CONFIG).save_pretrained(path)
    return str(path)


def test_encoder_delta_stores_only_changed_tensors_and_reloads_them(tmp_path, tiny_bert):
    base = load_query_encoder(tiny_bert, pooling="mean", normalize=True)
    trained = load_query_encoder(tiny_bert, pooling="mean", normalize=True)
    with torch.no_grad():
        trained.model.encoder.layer[-1].output.dense.weight.add_(0.01)
    manifest = save_encoder_delta(trained, base, tmp_path / "q")
    assert manifest["n_tensors"] == 1 and manifest["dtype"] == "float16"
    back = load_encoder_delta(tmp_path / "q", base_name_or_path=tiny_bert)
    assert back.pooling == "mean" and back.normalize
    for (name, a), b in zip(trained.model.state_dict().items(), back.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=name)
    texts = ["who wrote the iliad?", "when did it rain"]
    torch.testing.assert_close(trained.encode(texts), back.encode(texts), atol=2e-3, rtol=1e-3)


def test_a_corrupt_or_foreign_encoder_delta_is_refused(tmp_path, tiny_bert):
    base = load_query_encoder(tiny_bert)
    save_encoder_delta(base, base, tmp_path / "q")
    (tmp_path / "q" / "delta.safetensors").write_bytes(b"garbage")
    with pytest.raises(ReferenceModelError, match="SHA-256"):
        load_encoder_delta(tmp_path / "q", base_name_or_path=tiny_bert)
    with pytest.raises(ReferenceModelError, match="not a folder written by save_encoder_delta"):
        load_encoder_delta(tmp_path, base_name_or_path=tiny_bert)


def test_check_reference_names_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ReferenceModelError, match="MANIFEST.json is missing"):
        check_reference(tmp_path)
    (tmp_path / "rag").mkdir()
    (tmp_path / "rag" / "w.bin").write_bytes(b"weights")
    record = write_manifest(tmp_path, {"commit": "abc"})
    assert record["files"] == {"rag/w.bin": record["files"]["rag/w.bin"]} and record["total_bytes"] == 7
    assert check_reference(tmp_path)["commit"] == "abc"
    (tmp_path / "rag" / "w.bin").write_bytes(b"weightz")
    with pytest.raises(ReferenceModelError, match="corrupt"):
        check_reference(tmp_path)
    (tmp_path / "rag" / "w.bin").unlink()
    with pytest.raises(ReferenceModelError, match="missing"):
        check_reference(tmp_path)


@pytest.mark.skipif(not (REFERENCE_DIR / "MANIFEST.json").is_file(), reason="no reference model shipped yet")
def test_the_shipped_reference_is_whole_small_and_documented():
    manifest = check_reference()
    assert manifest["total_bytes"] <= 50 * 1024 * 1024
    assert manifest["command"].startswith("python scripts/train_reference.py")
    assert len(manifest["commit"]) >= 40 and manifest["hardware"]["cpu_count"]
    for stage in ("reader", "rag", "closed_book_reader", "closed_book"):
        assert manifest["stages"][stage]["global_step"] > 0
    assert any(name.startswith("logs/rag/metrics") and name.endswith(".csv") for name in manifest["files"])


def test_rag_reference_runs_systems_and_prints_a_table_with_examples(tmp_path, capsys):
    """The main job's machinery on tiny random models (the smoke experiment) and two questions per set."""
    from rag.cli import reference as cli

    ref = tmp_path / "ref"
    ref.mkdir()
    write_manifest(ref, {"commit": "0" * 40, "command": "python scripts/train_reference.py"})
    import sys

    runs = tmp_path / "runs"

    def overrides(*extra):
        return "[" + ",".join(f"'{o}'" for o in (f"runs_dir={runs}", "threads=1", *extra)) + "]"

    argv = [
        "rag-reference",
        f"reference_dir={ref}",
        f"cache_dir={tmp_path / 'cache'}",
        "limit=2",
        "n_docs=3",
        "examples=2",
        "threads=1",
        f"hydra.run.dir={tmp_path / 'out'}",
        "systems.rag_token.experiment=smoke",
        "systems.rag_sequence.experiment=smoke",
        "systems.rag_sequence.decoder=sequence_fast",
        "systems.closed_book.experiment=smoke",
        f"+systems.rag_token.overrides={overrides()}",
        f"+systems.rag_sequence.overrides={overrides()}",
        f"+systems.closed_book.overrides={overrides('model.retriever_mode=none')}",
    ]
    # through the console-script entry point: the training configs are composed inside the Hydra app
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        cli.main()
    out = capsys.readouterr().out
    assert "| RAG-Token | token_greedy | 3 |" in out and "| Closed-book BART | token_greedy | - |" in out
    assert "p(z|x)=" in out and "Q: " in out
    report = json.loads((tmp_path / "out" / "result.json").read_text())
    assert report["study"] == "table1" and report["command"].startswith("rag-reference")
    assert report["reference"]["commit"] == "0" * 40
    assert [r["system"] for r in report["rows"]] == ["rag_token", "rag_sequence", "closed_book"]
    assert report["rows"][0]["n"] == 4  # 2 SQuAD-open + 2 NQ-gold test questions
    assert report["rows"][2]["n_docs"] is None
    preds = [
        json.loads(line)
        for line in (tmp_path / "out" / "predictions-rag_token.jsonl").read_text().splitlines()
    ]
    assert len(preds) == 4 and all(len(p["passages"]) == 3 for p in preds)
    markdown = (tmp_path / "out" / "result.md").read_text()
    assert markdown.count("|") > 10 and "p(z|x)=" in markdown


def test_init_from_a_reference_folder_loads_its_generator_and_query_encoder(tmp_path, tiny_bert):
    from rag.build import init_weights
    from rag.errors import ConfigError
    from rag.generation.generator import bart_from_bert, save_delta
    from rag.lit_module import RagLitModule
    from rag.model import RagModel

    trained = bart_from_bert(tiny_bert, seed=3)
    with torch.no_grad():
        trained.model.model.decoder.layers[0].fc1.weight.mul_(1.5)
    save_delta(trained, tmp_path / "ref" / "generator", bert_name_or_path=tiny_bert)
    fresh = RagLitModule(RagModel(bart_from_bert(tiny_bert), retriever_mode="none"))
    # the delta records its base (here the tiny BERT's folder) and is rebuilt over it
    report = init_weights(fresh, tmp_path / "ref")
    assert not report["kept"]
    for (name, a), b in zip(trained.state_dict().items(), fresh.model.generator.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3, msg=name)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without generator/"):
        init_weights(fresh, tmp_path / "empty")
