"""The real rag-train entry point on the smoke experiment (CPU), checkpoint resume, seeded determinism, and
rag-evaluate on the smoke checkpoint."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from rag import build
from rag.cli import evaluate as evaluate_cli
from rag.cli import train as train_cli
from rag.config_dir import conf_dir
from rag.errors import ConfigError
from rag.evaluation import score_records


def smoke_overrides(root: Path) -> list[str]:
    return ["experiment=smoke", f"cache_dir={root / 'cache'}", f"runs_dir={root / 'runs'}", "threads=1"]


def csv_rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(next(run_dir.glob("csv/version_*/metrics.csv")).read_text().splitlines()))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """``rag-train experiment=smoke`` through the console-script function, as a user runs it."""
    root = tmp_path_factory.mktemp("smoke")
    argv = ["rag-train", *smoke_overrides(root), f"hydra.run.dir={root / 'runs' / 'first'}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        train_cli.main()
    return root


def test_smoke_run_of_the_entry_point_writes_checkpoints_and_metrics(first_run):
    out = first_run / "runs" / "first"
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["global_step"] == 4
    assert (out / "checkpoints" / "last.ckpt").is_file() and Path(summary["best_checkpoint"]).is_file()
    assert {"val/em", "val/f1", "val/loss", "val/answer_recall@3", "val/gold_recall@3"} <= set(summary["val"])
    assert {"test/em", "test/nq_gold/em", "test/squad_open/answer_recall@1"} <= set(summary["test"])
    rows = csv_rows(out)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    assert any(r.get("lr-AdamW/generator") for r in rows)  # the learning-rate monitor
    # the checkpoint holds trained weights and the run config, never the index or the passages
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["hyper_parameters"]["run_config"]["name"] == "smoke"
    assert not any("retriever" in k or "index" in k for k in checkpoint["state_dict"])


def test_same_seed_gives_identical_metrics_and_weights(first_run):
    cfg = compose_config(
        "train", [*smoke_overrides(first_run), f"output_dir={first_run / 'runs' / 'second'}", "test=false"]
    )
    summary = train_cli.run(cfg)
    first = json.loads((first_run / "runs" / "first" / "metrics.json").read_text())
    assert summary["val"] == first["val"]
    a = torch.load(first_run / "runs" / "first" / "checkpoints" / "last.ckpt", weights_only=False)[
        "state_dict"
    ]
    b = torch.load(first_run / "runs" / "second" / "checkpoints" / "last.ckpt", weights_only=False)[
        "state_dict"
    ]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_the_step_count(first_run):
    newest = build.find_resume_checkpoint(first_run / "runs")
    assert newest is not None and newest.name == "last.ckpt"
    cfg = compose_config(
        "train",
        [
            *smoke_overrides(first_run),
            f"output_dir={first_run / 'runs' / 'resumed'}",
            "resume=true",
            "trainer.max_steps=6",
            "test=false",
        ],
    )
    summary = train_cli.run(cfg)
    assert summary["resumed_from"] == str(newest)
    assert summary["global_step"] == 6
    # steps 1-4 come from the checkpoint: only 5 and 6 were trained in this run
    rows = csv_rows(first_run / "runs" / "resumed")
    assert len([r for r in rows if r.get("train/loss")]) == 2


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    cfg = compose_config("train", [*smoke_overrides(tmp_path), f"output_dir={tmp_path / 'o'}", "resume=true"])
    with pytest.raises(ConfigError, match="no last.ckpt or interrupted.ckpt"):
        train_cli.run(cfg)


def test_evaluate_reproduces_the_test_metrics_and_writes_passages_with_posteriors(first_run):
    first = json.loads((first_run / "runs" / "first" / "metrics.json").read_text())
    out = first_run / "eval"
    cfg = compose_config(
        "evaluate", [f"ckpt_path={first['best_checkpoint']}", f"output_dir={out}", "threads=1"]
    )
    report = evaluate_cli.run(cfg)
    # the checkpoint alone (config inside, index re-attached) answers exactly as the model did after training
    for key, value in report["metrics"].items():
        if key.rsplit("/", 1)[-1] != "n":
            assert first["test"][f"test/{key}"] == pytest.approx(value), key
    records = jsonl(out / "predictions.jsonl")
    assert len(records) == 8 and report["n_docs"] == 3
    for r in records:
        assert len(r["passages"]) == 3 and abs(sum(p["posterior"] for p in r["passages"]) - 1) < 1e-4
        assert {"id", "title", "text", "doc_score", "prior", "posterior"} <= set(r["passages"][0])
    assert json.loads((out / "metrics.json").read_text())["metrics"] == score_records(records, [1, 2, 3])

    # a test-time n_docs and decoder other than the training ones
    cfg = compose_config(
        "evaluate",
        [
            f"ckpt_path={first['best_checkpoint']}",
            f"output_dir={first_run / 'eval5'}",
            "n_docs=5",
            "decoder=sequence_fast",
            "+generation.num_beams=2",
            "limit=1",
            "split=val",
        ],
    )
    report = evaluate_cli.run(cfg)
    assert (report["n_docs"], report["decoder"], report["generation"]["num_beams"]) == (5, "sequence_fast", 2)
    records = jsonl(first_run / "eval5" / "predictions.jsonl")
    assert len(records) == 2 and all(len(r["passages"]) == 5 for r in records)


def test_init_from_copies_the_weights_it_shares_and_refuses_what_does_not_fit(first_run, tmp_path):
    from rag.lit_module import RagLitModule

    ckpt = first_run / "runs" / "first" / "checkpoints" / "last.ckpt"
    trained, _ = build.load_checkpoint(ckpt)
    cfg = compose_config("train", smoke_overrides(first_run))
    fresh = RagLitModule(build.build_model(cfg))
    assert not all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.state_dict().items())
    report = build.init_weights(fresh, ckpt)
    assert not report["kept"]
    for key, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    # a closed-book model shares the generator only: the rest of the checkpoint is ignored
    closed = RagLitModule(
        build.build_model(compose_config("train", [*smoke_overrides(first_run), "model.retriever_mode=none"]))
    )
    build.init_weights(closed, ckpt)
    assert torch.equal(
        closed.model.generator.model.lm_head.weight, trained.model.generator.model.lm_head.weight
    )
    # another architecture: named, not loaded half-way
    wider = RagLitModule(
        build.build_model(compose_config("train", [*smoke_overrides(first_run), "generator.d_model=32"]))
    )
    with pytest.raises(ConfigError, match="same generator / query encoder architecture"):
        build.init_weights(wider, ckpt)
    with pytest.raises(ConfigError, match="is not a file"):
        build.init_weights(fresh, tmp_path / "nope.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="could not be read"):
        build.init_weights(fresh, tmp_path / "bad.ckpt")


def test_a_checkpoint_of_the_config_before_the_retriever_group_loads_and_answers_the_same(
    first_run, tmp_path
):
    """Checkpoints written before ``retriever`` became a config group hold ``model.retriever_mode`` and top-level
    ``bm25`` / ``gold`` nodes instead: rewritten that way, the smoke checkpoint still loads and answers alike."""
    ckpt = first_run / "runs" / "first" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=False)
    config = checkpoint["hyper_parameters"]["run_config"]
    assert "retriever" in config and config["model"]["retriever_mode"] is None
    legacy = dict(config)
    del legacy["retriever"]
    legacy["model"] = {k: v for k, v in config["model"].items() if k != "train_query_encoder"}
    legacy["model"]["retriever_mode"] = "learned"
    legacy["gold"], legacy["bm25"] = {"window_words": None}, {"k1": 0.9, "b": 0.4, "stopwords": "english"}
    checkpoint["hyper_parameters"]["run_config"] = legacy
    old = tmp_path / "legacy.ckpt"
    torch.save(checkpoint, old)

    new_module, _ = build.load_checkpoint(ckpt)
    old_module, old_cfg = build.load_checkpoint(old)
    assert (
        old_cfg.retriever._target_ == "rag.build.dense_retriever"
        and old_module.model.retriever_mode == "learned"
    )
    questions = ["who wrote the republic?", "when did the war end?"]
    for new, old in zip(new_module.model.generate(questions), old_module.model.generate(questions)):
        assert (new.answer, [p.id for p in new.passages]) == (old.answer, [p.id for p in old.passages])
        assert new.score == pytest.approx(old.score)


@pytest.mark.parametrize("content", [b'{"id": "p1", "text": "not a checkpoint"}\n', b"\x80\x04K\x03."])
def test_a_file_that_is_not_a_checkpoint_is_one_clear_error(content, tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)  # a JSONL file, then a pickle of the integer 3
    with pytest.raises(ConfigError, match="give a .ckpt written by rag-train|not a rag-train checkpoint"):
        build.checkpoint_config(path)
