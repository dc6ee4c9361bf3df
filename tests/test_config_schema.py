"""Hydra as researchers use it: enum-like values checked at start (also under -m and --cfg), every command's
--help, -v/-q, the objective a sweeper reads, the debug and hparams_search configs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from rag.build import compose, conf_dir
from rag.cli import train as train_cli
from rag.cli.app import add_verbosity_flags, check_overrides, objective_value, verbosity_of
from rag.config_schema import CHOICES, problems, validate
from rag.errors import ConfigError

CONF = Path(conf_dir())
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
DEBUG = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


def smoke_overrides(root: Path) -> list[str]:
    return ["experiment=smoke", f"cache_dir={root / 'cache'}", f"runs_dir={root / 'runs'}", "threads=1"]


def run_main(monkeypatch, module, argv: list[str]):
    """``module.main()`` with ``sys.argv = argv``: (exit status, or None when it returned; its value)."""
    monkeypatch.setattr(sys, "argv", argv)
    try:
        return None, module.main()
    except SystemExit as exit_info:
        return exit_info.code, None


# ------------------------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose("train", [f"experiment={experiment}", "output_dir=/tmp/unused"])  # compose() validates
    assert problems(cfg) == []


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("train", []),
        ("rag_index", []),
        ("eval_retrieval", []),
        ("evaluate", []),
        ("reference", []),
        ("replicate", ["study=table1"]),
        ("convert_export", []),
        ("convert_import", []),
    ],
)
def test_every_command_config_validates_and_has_a_verbosity(name, overrides):
    cfg = compose(name, overrides)
    assert validate(cfg) is cfg and cfg.verbosity in CHOICES["verbosity"]()


@pytest.mark.parametrize(
    "name, override, expected",
    [
        (
            "train",
            "model.head=sequnce",
            "model.head=sequnce is not allowed: use one of token, sequence (did you mean model.head=sequence?)",
        ),
        (
            "train",
            "model.decoder=token_gredy",
            "model.decoder=token_gredy is not allowed: use one of null, token_greedy, token_beam, sequence_thorough, sequence_fast (did you mean model.decoder=token_greedy?)",
        ),
        (
            "train",
            "model.reduction=avg",
            "model.reduction=avg is not allowed: use one of none, sum, mean, token_mean",
        ),
        (
            "train",
            "model.retriever_mode=learnd",
            "model.retriever_mode=learnd is not allowed: use one of null, learned, frozen, bm25, none, gold (did you mean model.retriever_mode=learned?)",
        ),
        (
            "train",
            "optim.scheduler=cosine",
            "optim.scheduler=cosine is not allowed: use one of constant, linear, polynomial",
        ),
        ("train", "verbosity=loud", "verbosity=loud is not allowed: use one of debug, info, warning, error"),
        (
            "train",
            "index._target_=rag.retrieval.index.HNSW",
            "index._target_=rag.retrieval.index.HNSW is not an index kind: choose one with index=<flat|hnsw|hnsw_sq8|ivfpq|ivfpq_refine>",
        ),
        (
            "eval_retrieval",
            "indexes.hnsw._target_=x.Y",
            "indexes.hnsw._target_=x.Y is not an index kind: choose one with index@indexes.hnsw=<flat|hnsw|hnsw_sq8|ivfpq|ivfpq_refine>",
        ),
        (
            "evaluate",
            "split=tset",
            "split=tset is not allowed: use one of train, val, test (did you mean split=test?)",
        ),
        ("evaluate", "decoder=beam", "decoder=beam is not allowed: use one of null, token_greedy"),
        ("convert_export", "head=seq", "head=seq is not allowed: use one of null, token, sequence"),
        (
            "evaluate",
            "index_kind=hnws",
            "index_kind=hnws is not allowed: use one of null, flat, hnsw, hnsw_sq8, ivfpq, ivfpq_refine (did you mean index_kind=hnsw?)",
        ),
        ("replicate", "split=dev", "split=dev is not allowed: use one of train, val, test"),
        (
            "replicate",
            "limit=3",
            "study=null is not set: use one of decoding, figure3, figure3_train_k, hotswap, table1, table6",
        ),
        (
            "rag_index",
            "embed.dtype=bfloat16",
            "embed.dtype=bfloat16 is not allowed: use one of float32, float16",
        ),
    ],
)
def test_a_bad_value_fails_at_compose_with_one_line_naming_key_value_and_choices(
    name, override, expected, capsys
):
    with pytest.raises(ConfigError) as info:
        compose(name, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)
    # the command-line check says the same, one line, exit status 2
    with pytest.raises(SystemExit) as exit_info:
        check_overrides(name, [override], f"rag-{name}")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in err and err.count("\n") == 1


def test_several_bad_values_are_named_together_and_the_table_is_one_place():
    cfg = compose("train", ["experiment=smoke"])
    cfg.model.head, cfg.model.reduction = "tokn", "avg"
    found = problems(cfg)
    assert len(found) == 2 and found[0].startswith("model.head=tokn")
    assert {"model.head", "model.decoder", "model.retriever_mode", "split", "verbosity"} <= set(CHOICES)


def test_a_group_typo_names_the_options_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_overrides("train", ["experiment=smoke", "index=hsnw"], "rag-train")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert (
        "index=hsnw: no such option; use one of flat, hnsw, hnsw_sq8, ivfpq, ivfpq_refine, sharded (did you mean index=hnsw?)"
        in err
    )


# ------------------------------------------------------------------------------------------------ entry points


def test_the_entry_point_checks_every_value_of_a_multirun_sweep(monkeypatch, capsys):
    code, _ = run_main(
        monkeypatch, train_cli, ["rag-train", "-m", "experiment=smoke", "model.head=token,sequnce"]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "model.head=sequnce is not allowed" in err
        and "did you mean model.head=sequence?" in err
    )


def test_the_entry_point_checks_before_printing_the_config(monkeypatch, capsys):
    code, _ = run_main(
        monkeypatch, train_cli, ["rag-train", "--cfg", "job", "experiment=smoke", "model.head=sequnce"]
    )
    assert code == 2 and "model.head=sequnce is not allowed" in capsys.readouterr().err
    # the typo check runs with flags given too (it was skipped whenever an argument started with '-')
    code, _ = run_main(monkeypatch, train_cli, ["rag-train", "--cfg", "job", "experiment=smoke", "n_doc=3"])
    assert code == 2 and "no key 'n_doc' (did you mean 'n_docs'" in capsys.readouterr().err


def test_cfg_job_prints_the_checked_config_and_v_sets_the_verbosity(monkeypatch, capsys):
    code, _ = run_main(monkeypatch, train_cli, ["rag-train", "experiment=smoke", "--cfg", "job", "-v"])
    out = capsys.readouterr().out
    assert code in (None, 0) and "head: token" in out and "verbosity: debug" in out


@pytest.mark.parametrize(
    "module, argv, prog",
    [
        ("train", ["--help"], "rag-train"),
        ("index", ["--help"], "rag-index"),
        ("eval_retrieval", ["--help"], "rag-eval-retrieval"),
        ("evaluate", ["--help"], "rag-evaluate"),
        ("reference", ["--help"], "rag-reference"),
        ("replicate", ["--help"], "rag-replicate"),
        ("convert", ["export", "--help"], "rag-convert"),
        ("embed", ["-h"], "rag-embed"),
    ],
)
def test_every_command_has_its_own_help(module, argv, prog, monkeypatch, capsys):
    cli = importlib.import_module(f"rag.cli.{module}")
    code, _ = run_main(monkeypatch, cli, [prog, *argv])
    out = capsys.readouterr().out
    assert code in (None, 0), out
    assert out.lstrip().startswith(f"``{prog}") and "verbosity=debug|info|warning|error" in out
    assert ".log" in out and "== Config" in out and "Traceback" not in out


def test_rag_convert_alone_prints_its_usage_on_help(monkeypatch, capsys):
    from rag.cli import convert as convert_cli

    for flag in ("-h", "--help"):
        code, _ = run_main(monkeypatch, convert_cli, ["rag-convert", flag])
        out = capsys.readouterr().out
        assert code == 0 and out.startswith("``rag-convert``") and "usage: rag-convert import" in out


def test_argparse_commands_take_v_and_q():
    parser = argparse.ArgumentParser()
    add_verbosity_flags(parser)
    assert [verbosity_of(parser.parse_args(a)) for a in ([], ["-v"], ["-q"], ["-qq"], ["-qqq"])] == [
        None,
        -1,
        1,
        2,
        2,
    ]


# ------------------------------------------------------------------------------------------------ objective


def test_objective_value_reads_a_metric_of_the_summary():
    summary = {"global_step": 4, "val": {"val/em": 0.25, "val/loss": 3.0}, "test": {"test/em": 0.5}}
    assert objective_value(summary, "val/em") == 0.25 and objective_value(summary, "test/em") == 0.5
    assert objective_value(summary, "global_step") == 4.0
    with pytest.raises(
        ConfigError, match="objective=val/emm is not a metric of this run: use one of .*val/em"
    ):
        objective_value(summary, "val/emm")


def test_the_entry_returns_the_objective_and_logs_to_its_own_file(tmp_path, monkeypatch):
    """What Hydra's sweeper reads is the task's return value; the console script itself returns None, since
    ``sys.exit(main())`` would print anything else and exit 1."""
    from rag.cli.app import hydra_entry

    run_dir = tmp_path / "run"
    argv = [
        "rag-train",
        *smoke_overrides(tmp_path),
        "debug=fast_dev_run",
        "objective=val/em",
        f"hydra.run.dir={run_dir}",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    value = hydra_entry(train_cli.run, "train", "rag-train")
    assert isinstance(value, float) and 0.0 <= value <= 1.0
    monkeypatch.setattr(sys, "argv", [*argv[:-1], f"hydra.run.dir={tmp_path / 'again'}"])
    assert train_cli.main() is None
    log_file = run_dir / "rag-train.log"
    assert log_file.is_file() and "[rag." in log_file.read_text()  # the package's lines reach the run's file
    logging.getLogger("rag").handlers[:] = [
        h for h in logging.getLogger("rag").handlers if not isinstance(h, logging.FileHandler)
    ]


def test_a_misspelled_objective_fails_before_the_run(monkeypatch, capsys):
    code, _ = run_main(monkeypatch, train_cli, ["rag-train", "experiment=smoke", "objective=val/emm"])
    err = capsys.readouterr().err
    assert code == 2 and "objective=val/emm is not a metric" in err
    assert "did you mean objective=val/em?" in err
    for good in ("val/em", "test/f1", "val/answer_recall@5", "val/nq/em", "global_step"):
        check_overrides("train", ["experiment=smoke", f"objective={good}"], "rag-train")


def test_a_failed_trial_of_a_multirun_does_not_end_the_sweep(tmp_path, monkeypatch, capsys):
    from rag.cli.app import hydra_entry

    argv = ["rag-train", "-m", "experiment=smoke", f"ckpt_path={tmp_path / 'missing.ckpt'}", "seed=1,2"]
    monkeypatch.setattr(sys, "argv", [*argv, "objective=val/em", f"hydra.sweep.dir={tmp_path / 'a'}"])
    values = hydra_entry(train_cli.run, "train", "rag-train")
    assert len(values) == 2 and all(v != v for v in values)  # nan: the sweeper ranks the trial last
    err = capsys.readouterr().err
    assert err.count("this run failed: ckpt_path=") == 2
    monkeypatch.setattr(sys, "argv", [*argv, f"hydra.sweep.dir={tmp_path / 'b'}"])
    assert hydra_entry(train_cli.run, "train", "rag-train") == [None, None]
    # a single run still fails at once, exit status 1
    code, _ = run_main(monkeypatch, train_cli, [argv[0], *argv[2:4]])
    assert code == 1 and "is not a file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ debug, hparams_search


@pytest.mark.parametrize("debug", DEBUG)
def test_debug_configs_compose_over_an_experiment(debug):
    cfg = compose("train", ["experiment=smoke", f"debug={debug}", "output_dir=/tmp/unused"])
    trainer = cfg.trainer
    assert trainer.get("fast_dev_run") or trainer.get("overfit_batches") or trainer.get("limit_train_batches")
    assert "/debug/" in cfg.runs_dir
    assert {"fast_dev_run", "overfit_batch", "limit_batches"} == set(DEBUG)


def test_fast_dev_run_runs_the_smoke_experiment(tmp_path):
    cfg = compose(
        "train", [*smoke_overrides(tmp_path), "debug=fast_dev_run", f"output_dir={tmp_path / 'out'}"]
    )
    summary = train_cli.run(cfg)
    assert summary["global_step"] == 1 and "val/em" in summary["val"] and "test/em" in summary["test"]
    assert not list((tmp_path / "out").glob("csv"))  # no logger


def test_the_hparams_search_sweeps_keys_of_the_training_config():
    search = OmegaConf.load(CONF / "hparams_search" / "miniwiki_optuna.yaml")
    params = OmegaConf.to_container(search.hydra.sweeper.params)
    cfg = compose("train", ["experiment=miniwiki_rag_token", "output_dir=/tmp/unused"])
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    assert all(o.is_sweep_override() for o in parsed)
    assert all(OmegaConf.select(cfg, key, default=None) is not None for key in params)
    assert search.objective == "val/em" and search.hydra.sweeper.direction == "maximize"
    if importlib.util.find_spec("hydra_plugins") and importlib.util.find_spec(
        "hydra_plugins.hydra_optuna_sweeper"
    ):
        with pytest.raises(SystemExit) as exit_info:  # the sweep's values are checked too
            check_overrides(
                "train",
                ["experiment=smoke", "hparams_search=miniwiki_optuna", "model.head=token,sequnce"],
                "rag-train",
                multirun=True,
            )
        assert exit_info.value.code == 2
