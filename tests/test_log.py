"""rag.log.configure_logging: one stderr handler on the ``rag`` logger, its levels, rank zero only, idempotent."""

from __future__ import annotations

import logging

import pytest

from rag.errors import ConfigError
from rag.log import (
    RankZeroFilter,
    StderrHandler,
    configure_from_env,
    configure_logging,
    parse_level,
    process_rank,
    short_name,
)

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


@pytest.fixture(autouse=True)
def rag_logger(monkeypatch):
    """The ``rag`` logger as the tests found it (tests/conftest.py configures it), restored after each test;
    the launcher's rank variables and this package's log variables unset."""
    logger = logging.getLogger("rag")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    filters = {h: list(h.filters) for h in logger.handlers}
    for variable in (*RANK_VARIABLES, "RAG_LOG_LEVEL", "RAG_LOG_ALL_RANKS"):
        monkeypatch.delenv(variable, raising=False)
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    for handler, kept in filters.items():
        handler.filters[:] = kept


def ours(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, StderrHandler)]


def test_levels_by_name_and_number():
    assert [parse_level(v) for v in ("debug", "info", "WARNING", "error")] == [10, 20, 30, 40]
    assert [parse_level(v) for v in (-1, 0, 1, 2)] == [10, 20, 30, 40]
    assert parse_level("-1") == logging.DEBUG
    for bad in ("loud", 3, True, None):
        with pytest.raises(ConfigError, match="unknown log verbosity"):
            parse_level(bad)


def test_lines_name_the_module_or_the_command():
    assert short_name("rag.data.arrow") == "rag.arrow"
    assert short_name("rag.retrieval.index") == "rag.index"
    assert short_name("rag.cli.train") == "rag-train"
    assert short_name("rag.cli.eval_retrieval") == "rag-eval-retrieval"
    assert short_name("rag") == "rag" and short_name("faiss") == "faiss"


def test_info_lines_reach_stderr_at_info_and_not_at_warning(rag_logger, capsys):
    configure_logging("info")
    log = logging.getLogger("rag.data.arrow")
    log.debug("hidden")
    log.info("converting x")
    log.warning("careful")
    assert capsys.readouterr().err == "[rag.arrow] converting x\n[rag.arrow] warning: careful\n"
    configure_logging(1)
    log.info("converting y")
    log.warning("still shown")
    logging.getLogger("rag.cli.aggregate").error("broken")
    assert capsys.readouterr().err == "[rag.arrow] warning: still shown\n[rag-aggregate] error: broken\n"
    configure_logging("debug")
    log.debug("shown now")
    assert capsys.readouterr().err == "[rag.arrow] shown now\n"


def test_the_level_defaults_to_the_environment(rag_logger, monkeypatch):
    configure_logging()
    assert rag_logger.level == logging.INFO
    monkeypatch.setenv("RAG_LOG_LEVEL", "error")
    configure_logging()
    assert rag_logger.level == logging.ERROR
    assert configure_from_env() and rag_logger.level == logging.ERROR
    monkeypatch.delenv("RAG_LOG_LEVEL")
    assert not configure_from_env()


def test_calling_it_twice_adds_no_second_handler(rag_logger, capsys):
    configure_logging("info")
    configure_logging("info")
    configure_logging("warning", all_ranks=True)
    configure_logging("info")
    assert len(ours(rag_logger)) == 1
    assert sum(isinstance(f, RankZeroFilter) for f in ours(rag_logger)[0].filters) == 1
    logging.getLogger("rag.replication.studies").info("once")
    assert capsys.readouterr().err == "[rag.studies] once\n"
    assert rag_logger.propagate is False  # not also through the root logger's handlers (Hydra's console)


def test_only_rank_zero_logs(rag_logger, monkeypatch, capsys):
    configure_logging("info")
    log = logging.getLogger("rag.retrieval.distributed_embed")
    assert process_rank() == 0
    log.info("rank zero")
    for variable in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.setenv(variable, "1")
        assert process_rank() == 1
        log.info(f"{variable}=1")
        monkeypatch.delenv(variable)
    # a node's first process (LOCAL_RANK 0) on the second node (RANK 4) is not rank zero
    assert process_rank({"RANK": "4", "LOCAL_RANK": "0"}) == 4
    assert process_rank({"RANK": "0", "LOCAL_RANK": "0", "SLURM_PROCID": "0"}) == 0
    assert capsys.readouterr().err == "[rag.distributed_embed] rank zero\n"

    configure_logging("info", all_ranks=True)
    monkeypatch.setenv("RANK", "1")
    log.info("every rank")
    assert capsys.readouterr().err == "[rag.distributed_embed] every rank\n"


def test_the_rank_is_read_when_logging_so_lightnings_later_rank_counts(rag_logger, monkeypatch, capsys):
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    configure_logging("info")
    log = logging.getLogger("rag.lit_module")
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)  # what a strategy sets in its processes
    log.info("from rank one")
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    log.info("from rank zero")
    assert capsys.readouterr().err == "[rag.lit_module] from rank zero\n"


def test_the_handler_writes_to_the_current_stderr(rag_logger, capfd):
    configure_logging("info")
    logging.getLogger("rag.model").info("to the file descriptor")
    assert "[rag.model] to the file descriptor" in capfd.readouterr().err


def test_a_bad_environment_level_warns_and_logs_at_info(rag_logger, monkeypatch):
    import subprocess
    import sys

    monkeypatch.setenv("RAG_LOG_LEVEL", "loud")
    with pytest.warns(UserWarning, match="RAG_LOG_LEVEL='loud' ignored, logging at info"):
        assert configure_from_env()
    assert rag_logger.level == logging.INFO
    # `import rag` calls it: a typo in the variable must not make the package unimportable
    done = subprocess.run([sys.executable, "-c", "import rag"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "RAG_LOG_LEVEL='loud' ignored" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_config_folder_is_one_line_not_a_trace_at_import(monkeypatch, capsys, tmp_path):
    import importlib
    import sys

    import rag.cli
    import rag.config_dir

    monkeypatch.setattr(rag.config_dir, "PACKAGE", tmp_path / "rag")  # neither <repo>/conf nor rag/conf
    importlib.reload(rag.cli)  # importing rag.cli does not look for the configs
    with pytest.raises(ConfigError, match="no config folder"):
        rag.cli.CONF_DIR  # noqa: B018 - it is looked for on first use

    from rag.cli import train as train_cli

    monkeypatch.setattr(sys, "argv", ["rag-train", "experiment=smoke"])
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: no config folder") and err.count("\n") == 1
