"""Hydra configs: every experiment composes and instantiates with the tiny options swapped in; typos and
unset required values fail at once with a clear message; the paper experiments carry the paper's settings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rag.build import build_callbacks, build_loggers, build_model, check_required, conf_dir, instantiate
from rag.cli.app import check_overrides
from rag.cli.train import main as train_main
from rag.cli.train import run as train_run
from rag.data.datamodule import RagDataModule
from rag.errors import ConfigError
from rag.lit_module import RagLitModule
from rag.model import RagModel
from rag.retrieval.retriever import BM25Retriever, DenseRetriever, GoldRetriever

CONF_DIR = conf_dir()
EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
NQ_FIXTURE = Path(__file__).parent / "fixtures" / "data" / "NQ-open.dev.jsonl"


def tiny_overrides(tmp: Path) -> list[str]:
    """Tiny random encoders and generator, a 64-passage slice of the mini-wiki, small data, CPU, tmp dirs."""
    return [
        "query_encoder=tiny",
        "doc_encoder=tiny",
        "generator=tiny",
        "trainer=cpu",
        "corpus=miniwiki",
        "corpus.name=tiny64",
        "corpus.passages._target_=rag.data.datamodule.corpus_slice",
        "++corpus.passages.passages={_target_: rag.data.miniwiki.load_corpus}",
        "++corpus.passages.limit=64",
        "++index.verbose=false",
        "embed.show_progress=false",
        "data.limit_train=4",
        "data.limit_val=2",
        "data.limit_test=2",
        f"cache_dir={tmp / 'cache'}",
        f"output_dir={tmp / 'out'}",
        f"runs_dir={tmp / 'runs'}",
    ]


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def nq_paths() -> list[str]:
    return [f"data.{split}.nq.path={NQ_FIXTURE}" for split in ("train", "val", "test")]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates_with_tiny_parts(experiment, tmp_path):
    extra = nq_paths() if experiment.startswith("nq_") else []
    cfg = compose_train([f"experiment={experiment}", *tiny_overrides(tmp_path), *extra])
    check_required(cfg)
    # every key of every constructed object is an argument of its constructor: instantiation proves it
    data = instantiate(cfg.data)
    assert isinstance(data, RagDataModule) and len(data.sets["train"]) > 0
    model = build_model(cfg)
    assert isinstance(model, RagModel)
    passages = instantiate(cfg.corpus.passages)
    module = instantiate(cfg.module, _partial_=True)(
        model=model, run_config=OmegaConf.to_container(cfg, resolve=True)
    )
    assert isinstance(module, RagLitModule) and module.optim.lr == cfg.optim.lr
    trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg), logger=build_loggers(cfg) or False)
    assert isinstance(trainer, pl.Trainer) and trainer.max_steps == cfg.trainer.max_steps

    expected_head = "sequence" if "sequence" in experiment else "token"
    expected_mode = "none" if "closed_book" in experiment else "gold" if "reader" in experiment else "learned"
    assert (model.head, model.retriever_mode) == (expected_head, expected_mode)
    if expected_mode == "gold":
        assert isinstance(model.retriever, GoldRetriever) and model.n_docs == 1
    elif expected_mode == "learned":
        assert isinstance(model.retriever, DenseRetriever) and model.retriever.n_passages == 64
        assert model.n_docs == cfg.n_docs
    else:
        assert model.retriever is None and model.query_encoder is None
    # one generation and one loss through the instantiated model
    model.eval()
    question = data.questions("val")[:1]
    if expected_mode == "gold":  # a question whose gold passage is in the 64-passage slice
        ids = {p.id for p in passages}
        question = [q for q in data.questions("train") if set(q.gold_passage_ids) <= ids][:1]
    assert model(question, [question[0].answers[0]]).loss.isfinite()
    assert isinstance(model.generate(question, max_new_tokens=2)[0].answer, str)


@pytest.mark.parametrize("mode, retriever", [("bm25", BM25Retriever), ("frozen", DenseRetriever)])
def test_retriever_ablations_by_override(mode, retriever, tmp_path):
    cfg = compose_train(["experiment=smoke", *tiny_overrides(tmp_path), f"model.retriever_mode={mode}"])
    model = build_model(cfg)
    assert isinstance(model.retriever, retriever) and model.retriever_mode == mode


def test_command_line_n_docs_and_head_reach_the_model(tmp_path):
    cfg = compose_train(
        ["experiment=smoke", *tiny_overrides(tmp_path), "model.head=sequence", "n_docs=4", "eval_n_docs=6"]
    )
    model = build_model(cfg)
    assert (model.head, model.n_docs, model.eval_n_docs, model.default_decoder()) == (
        "sequence",
        4,
        6,
        "sequence_thorough",
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.hed=sequence", "no key 'model.hed' (did you mean 'model.head'?)"),
        ("model=rag_tokn", "Could not find 'model/rag_tokn'"),
        ("experiment=smok", "Could not find 'experiment/smok'"),
        ("n_doc=3", "no key 'n_doc' (did you mean 'n_docs'"),
    ],
)
def test_config_typos_fail_at_once_with_a_hint(override, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_overrides("train", ["experiment=smoke", override], "rag-train")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "hint:" in err and "--cfg job" in err


def test_the_entry_point_checks_overrides_before_running(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rag-train", "experiment=smoke", "trainer.max_step=3"])
    with pytest.raises(SystemExit) as exit_info:
        train_main()
    assert exit_info.value.code == 2 and "max_step" in capsys.readouterr().err


def test_unset_required_values_are_named_before_anything_loads(tmp_path):
    cfg = compose_train(["experiment=nq_rag_token", *tiny_overrides(tmp_path)])
    with pytest.raises(ConfigError, match=r"data.test.nq.path, data.train.nq.path, data.val.nq.path"):
        train_run(cfg)


def test_paper_experiments_carry_the_paper_settings():
    token = compose_train(["experiment=nq_rag_token", "output_dir=/tmp/unused"])
    sequence = compose_train(["experiment=nq_rag_sequence", "output_dir=/tmp/unused"])
    for cfg in (token, sequence):
        # transformers' examples/research_projects/rag/finetune_rag.sh
        assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.scheduler) == (3e-5, 500, "polynomial")
        assert (cfg.optim.weight_decay, cfg.optim.adam_epsilon, cfg.trainer.gradient_clip_val) == (
            0.001,
            1e-8,
            0.1,
        )
        assert (cfg.model.label_smoothing, cfg.data.batch_size, cfg.model.max_target_length) == (0.1, 8, 25)
        assert cfg.generator.name_or_path == "facebook/bart-large"
        assert cfg.query_encoder.model_name_or_path == "facebook/dpr-question_encoder-single-nq-base"
        assert cfg.doc_encoder.model_name_or_path == "facebook/dpr-ctx_encoder-single-nq-base"
        assert cfg.n_docs in (5, 10) and cfg.index._target_.endswith("HNSWIndex")
    # test decoding: RAG-Token greedy over 15 documents, RAG-Sequence thorough with beam 4 over 50
    assert (token.model.head, token.model.decoder, token.model.generation.num_beams, token.eval_n_docs) == (
        "token",
        "token_greedy",
        1,
        15,
    )
    assert (sequence.model.head, sequence.model.decoder, sequence.model.generation.num_beams) == (
        "sequence",
        "sequence_thorough",
        4,
    )
    assert sequence.eval_n_docs == 50
