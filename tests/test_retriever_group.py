"""The retriever as a config group (dense, bm25, gold, none) with training the query encoder as its own
switch; configs written before it (``model.retriever_mode``, top-level ``bm25`` / ``gold``) still build the
same models."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rag.build import build_model, conf_dir, retriever_mode, upgrade_config
from rag.errors import ConfigError
from rag.retrieval.retriever import BM25Retriever, DenseRetriever, GoldRetriever

LOGS = Path(__file__).resolve().parents[1] / "rag" / "reference_weights" / "logs"
CONF_DIR = conf_dir()


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def smoke(tmp: Path, *extra: str):
    return compose_train(["experiment=smoke", f"cache_dir={tmp / 'cache'}", "threads=1", *extra])


def test_every_option_of_the_group_is_listed_and_composes():
    options = sorted(p.stem for p in (Path(CONF_DIR) / "retriever").glob("*.yaml"))
    assert {"dense", "bm25", "gold", "none"} <= set(options)
    for option in options:
        cfg = compose_train(["experiment=smoke", f"retriever={option}"])
        assert "_target_" in cfg.retriever


@pytest.mark.parametrize(
    "overrides, kind, mode",
    [
        ([], DenseRetriever, "learned"),
        (["model.train_query_encoder=false"], DenseRetriever, "frozen"),
        (["retriever=bm25"], BM25Retriever, "bm25"),
        (["retriever=gold"], GoldRetriever, "gold"),
        (["retriever=none"], type(None), "none"),
        (["model=closed_book"], type(None), "none"),
    ],
)
def test_each_option_builds_its_retriever_and_mode(overrides, kind, mode, tmp_path):
    cfg = smoke(tmp_path, *overrides)
    assert retriever_mode(cfg) == mode  # read off the config, before anything is built
    model = build_model(cfg)
    assert isinstance(model.retriever, kind) and model.retriever_mode == mode
    # a query encoder exactly where one is searched with; trained only in the learned mode
    assert (model.query_encoder is not None) == (kind is DenseRetriever)
    if model.query_encoder is not None:
        trainable = any(p.requires_grad for p in model.query_encoder.parameters())
        assert trainable == (mode == "learned") == model.trains_query_encoder


@pytest.mark.parametrize(
    "legacy, new",
    [
        ("learned", []),
        ("frozen", ["model.train_query_encoder=false"]),
        ("bm25", ["retriever=bm25"]),
        ("gold", ["retriever=gold"]),
        ("none", ["retriever=none"]),
    ],
)
def test_the_legacy_retriever_mode_builds_what_the_group_builds(legacy, new, tmp_path):
    old = smoke(tmp_path, f"model.retriever_mode={legacy}")
    upgrade_config(old)
    fresh = smoke(tmp_path, *new)
    assert OmegaConf.to_container(old.retriever) == OmegaConf.to_container(fresh.retriever)
    assert old.model.train_query_encoder == fresh.model.train_query_encoder
    assert build_model(old).retriever_mode == legacy


def test_a_bad_legacy_mode_names_the_new_keys(tmp_path):
    with pytest.raises(ConfigError, match="retriever=dense\\|bm25\\|gold\\|none"):
        upgrade_config(smoke(tmp_path, "model.retriever_mode=learnd"))


@pytest.mark.parametrize(
    "stage, option, window, trains",
    [
        ("reader", "gold", 64, True),
        ("reader_full", "gold", None, True),
        ("rag", "dense", None, True),
        ("closed_book", "none", None, True),
    ],
)
def test_run_configs_stored_before_the_group_upgrade_with_their_settings(stage, option, window, trains):
    """The shipped reference's training logs hold configs of the old form (model.retriever_mode, gold: ...)."""
    cfg = upgrade_config(OmegaConf.load(LOGS / stage / "config.yaml"))
    new = OmegaConf.load(Path(CONF_DIR) / "retriever" / f"{option}.yaml")
    assert cfg.retriever._target_ == new._target_
    assert cfg.model.retriever_mode is None and "gold" not in cfg and "bm25" not in cfg
    if option == "gold":
        assert cfg.retriever.window_words == window
    if option == "dense":
        assert cfg.model.train_query_encoder is trains
