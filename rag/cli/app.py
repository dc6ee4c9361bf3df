"""What every command shares: the config check before Hydra runs, Hydra's entry point, one-line errors.

Each ``rag-*`` command is ``hydra_entry(run, config_name, prog)`` around a ``run(cfg)`` that parses its config,
calls the library (:mod:`rag.build`, :mod:`rag`) and reports; a :class:`~rag.errors.RagError` raised anywhere
below is caught here once and printed as one line, with exit status 1. Before Hydra runs, the command line is
composed and checked (:func:`check_overrides`: unknown keys and options, and the enum-like values of
:mod:`rag.config_schema`, for every value of a ``-m`` sweep too), so a typo fails at once with exit status 2.

Every command also takes ``verbosity=debug|info|warning|error`` (``-v``, ``-q``, ``-qq`` for short), names its
Hydra job after itself (``hydra.job.name``: the run folder's ``<prog>.log``, the ``--help`` title), and
returns what ``run`` returned, or the metric its ``objective`` key names (a float a sweeper can optimise; a
name no run reports fails at once, exit status 2). Under ``-m`` a failed run logs its error and the sweep goes on.
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from rag.config_dir import conf_dir
from rag.errors import ConfigError, RagError

log = logging.getLogger(__name__)

#: how many configs the check of a ``-m`` sweep composes at most (one per swept value)
MAX_SWEEP_CHECKS = 64
#: the short flags for ``verbosity=...``, replaced before Hydra parses the command line
VERBOSITY_FLAGS = {"-v": "debug", "--verbose": "debug", "-q": "warning", "--quiet": "warning", "-qq": "error"}
HELP_OPTIONS = """\
== Options every rag command takes ==
  verbosity=debug|info|warning|error   how much the package logs (default: $RAG_LOG_LEVEL, else info);
                                       -v is verbosity=debug, -q verbosity=warning, -qq verbosity=error
  --cfg job [--resolve]                print the composed config (checked) instead of running
  -m key=a,b ...                       one run per value (a sweep; hydra.sweeper.params in a config too)
  Each run writes its lines to <run folder>/{job}.log and its config to <run folder>/.hydra/.
"""


def add_verbosity_flags(parser) -> None:
    """``-v``/``--verbose`` and ``-q``/``--quiet`` (repeatable) on an argparse command; :func:`verbosity_of`
    reads them back for :func:`rag.log.configure_logging`."""
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (debug lines)")
    parser.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=0,
        help="log less: -q warnings and errors only, -qq errors only",
    )


def verbosity_of(args) -> int | None:
    """The verbosity (-1 debug .. 2 error) of :func:`add_verbosity_flags`' flags; None: neither was given
    ($RAG_LOG_LEVEL, else info)."""
    level = args.quiet - args.verbose
    return None if not (args.quiet or args.verbose) else max(-1, min(2, level))


def fail(err: Exception) -> None:
    """Print a known error as one message and exit with status 1 (no stack trace)."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


CONFIG_HINT = (
    "hint: keys are listed by `{prog} --cfg job`, a group's options are the files in {conf}/<group>/; "
    "a key the config does not have is added with a leading + (`+key=value`) only on purpose"
)


def _is_hydra_override(override: str) -> bool:
    return override.startswith(("hydra.", "hydra/", "+hydra", "~hydra", "++hydra"))


def _compose(config_name: str, overrides: Sequence[str], return_hydra_config: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(
            config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
        )


def check_overrides(config_name: str, overrides: Sequence[str], prog: str, multirun: bool = False) -> None:
    """Compose the config once before Hydra runs, so that a typo (unknown key or group option, or a value
    outside :mod:`rag.config_schema`'s allowed ones) fails at once with a one-line message and exit status 2,
    before anything is loaded. Under ``multirun`` every swept value is composed and checked."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rag.config_schema import validate

    plain = [o for o in overrides if not _is_hydra_override(o)]
    try:
        combos = _sweep_combinations(config_name, plain) if multirun else [plain]
        for combo in combos:
            cfg = validate(_compose(config_name, combo))
            if cfg.get("objective"):
                check_objective(str(cfg.objective))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (HydraException, OmegaConfBaseException) as err:
        message = str(err).strip()
        unknown = re.match(r"Could not override '([^']+)'", message)
        if unknown:
            message += "\n" + _unknown_key_line(config_name, plain, unknown.group(1))
        message = _option_suggestion(message)
        print(
            f"error: {message}\n{CONFIG_HINT.format(prog=prog, conf=conf_dir())}", file=sys.stderr, flush=True
        )
        sys.exit(2)


def _sweep_combinations(config_name: str, overrides: Sequence[str]) -> list[list[str]]:
    """The override lists that together hold every value of a sweep once: the first value of each swept key,
    then each other value of one key at a time (not the whole product). The swept keys are the command
    line's and the config's ``hydra.sweeper.params``; intervals and globs (not enumerable here) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(list(overrides))
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = {o.get_key_element(): o for o in parsed if o.is_sweep_override()}
    first = [f"{key}={next(iter(_values(o)), '')}" for key, o in sweeps.items() if _values(o)]
    params = OmegaConf.select(
        _compose(config_name, [*fixed, *first], return_hydra_config=True),
        "hydra.sweeper.params",
        default=None,
    )
    if params:
        for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()]):
            sweeps.setdefault(o.get_key_element(), o)
    values = {
        key: _values(o)
        for key, o in sweeps.items()
        if o.value_type != ValueType.GLOB_CHOICE_SWEEP and not o.is_interval_sweep()
    }
    values = {key: v for key, v in values.items() if v}
    base = [*fixed, *(f"{key}={v[0]}" for key, v in values.items())]
    combos = [base]
    for i, (key, swept) in enumerate(values.items()):
        for value in swept[1:]:
            if len(combos) >= MAX_SWEEP_CHECKS:
                return combos
            combo = list(base)
            combo[len(fixed) + i] = f"{key}={value}"
            combos.append(combo)
    return combos


def _values(override) -> list[str]:
    if not override.is_sweep_override():
        return [override.get_value_element_as_str()]
    if not override.is_discrete_sweep():
        return []
    try:
        return list(override.sweep_string_iterator())
    except Exception:  # a glob needs Hydra's config loader: its options are checked when Hydra runs
        return []


def _option_suggestion(message: str) -> str:
    """Hydra's "Could not find 'index/hsnw'" (with its option list and search path) as two lines: Hydra's
    first and "index=hsnw: use one of flat, hnsw, ... (did you mean index=hnsw?)"."""
    message = message.split("\nConfig search path:", 1)[0].strip()
    missing = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    listed = re.split(r"Available options(?: in '[^']*')?:", message, maxsplit=1)
    if not missing or len(listed) < 2:
        return message
    options = [line.strip() for line in listed[1].splitlines() if line.strip()]
    group, value = missing.group(1).lstrip("/"), missing.group(2)
    line = f"{group}={value}: no such option; use one of {', '.join(options)}"
    close = difflib.get_close_matches(value, options, n=1, cutoff=0.5)
    if close:
        line += f" (did you mean {group}={close[0]}?)"
    return f"{listed[0].strip()}\n{line}"


def _unknown_key_line(config_name: str, overrides: Sequence[str], key: str) -> str:
    """ "the config has no key X", with the closest keys of its parent node when the rest composes."""
    line = f"the config has no key '{key}'"
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    parent, _, name = key.rpartition(".")
    try:
        cfg = _compose(config_name, rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        keys = list(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:  # the suggestion is a courtesy: the error itself is reported either way
        keys = []
    close = difflib.get_close_matches(name, [str(k) for k in keys], n=3)
    if close:
        line += " (did you mean " + ", ".join(f"'{parent + '.' if parent else ''}{c}'" for c in close) + "?)"
    return line


#: what ``objective`` may name: a metric rag-train logs for validation or test (:mod:`rag.lit_module`:
#: ``val/em``, ``test/f1``, ``val/answer_recall@5``, one set's ``val/nq/em``) or a number at the top of
#: rag-train's summary (:func:`rag.cli.train.run`)
OBJECTIVE_METRICS = ("loss", "em", "f1", "answer_recall@K", "gold_recall@K")
SUMMARY_NUMBERS = ("global_step", "wall_seconds", "peak_rss_mb")
_OBJECTIVE = re.compile(r"(val|test)/([\w.-]+/)?(loss|em|f1|answer_recall@\d+|gold_recall@\d+)")


def check_objective(objective: str) -> None:
    """Raise :class:`~rag.errors.ConfigError` (one line) unless ``objective`` names a metric a training run
    reports (:data:`OBJECTIVE_METRICS` under ``val/`` or ``test/``, or one of :data:`SUMMARY_NUMBERS`), so
    that a typo fails before the run, not after it."""
    if objective in SUMMARY_NUMBERS or _OBJECTIVE.fullmatch(objective):
        return
    examples = [f"{split}/{m.replace('@K', '@5')}" for split in ("val", "test") for m in OBJECTIVE_METRICS]
    close = difflib.get_close_matches(objective, [*examples, *SUMMARY_NUMBERS], n=1, cutoff=0.6)
    raise ConfigError(
        f"objective={objective} is not a metric a run reports: use val/<metric> or test/<metric> (metric "
        f"{', '.join(OBJECTIVE_METRICS)}; one set's: val/<set>/<metric>) or one of {', '.join(SUMMARY_NUMBERS)}"
        + (f" (did you mean objective={close[0]}?)" if close else "")
    )


def objective_value(result: Any, objective: str) -> float:
    """The metric ``objective`` (e.g. ``val/em``) of a run's result: a key of the result, or of one of its
    sections (rag-train's summary keeps ``val/...`` under ``val`` and ``test/...`` under ``test``)."""
    if isinstance(result, Mapping):
        if isinstance(result.get(objective), (int, float)):
            return float(result[objective])
        for section in result.values():
            if isinstance(section, Mapping) and isinstance(section.get(objective), (int, float)):
                return float(section[objective])
        known = sorted(
            [k for k, v in result.items() if isinstance(v, (int, float))]
            + [k for v in result.values() if isinstance(v, Mapping) for k in v]
        )
        raise ConfigError(f"objective={objective} is not a metric of this run: use one of {', '.join(known)}")
    raise ConfigError(f"objective={objective}: this command returns no metrics; set objective=null")


def _log_to_run_file() -> None:
    """Send the package's lines to the run's log file too (Hydra's file handler sits on the root logger, and
    :func:`rag.log.configure_logging` stops the ``rag`` logger's records from reaching it)."""
    package = logging.getLogger("rag")
    for handler in [h for h in package.handlers if isinstance(h, logging.FileHandler)]:
        package.removeHandler(handler)  # a previous run's file, in the same process
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            package.addHandler(handler)


def _help_template(task: Callable, prog: str, job: str) -> str:
    """Hydra's ``--help`` page: the command's module docstring, the options every command takes, then
    Hydra's groups and config. Escaped twice: for OmegaConf (``${``) and for string.Template (``$``)."""
    doc = (sys.modules[task.__module__].__doc__ or prog).strip()
    text = f"{doc}\n\n{HELP_OPTIONS.format(job=job)}".replace("$", "$$").replace("${", "\\${")
    return (
        text + "\n== Configuration groups (group=option) ==\n$APP_CONFIG_GROUPS\n"
        "== Config (key=value; a key it lacks: +key=value) ==\n$CONFIG\n"
        "Hydra's own flags: --hydra-help\n"
    )


def _split_command_line(words: list[str]):
    """Hydra's parse of the words, and the overrides and flags apart: ``-v``/``-q`` become ``verbosity=...``
    and overrides given after a flag (``--cfg job key=value``, which argparse refuses) count as overrides."""
    from hydra._internal.utils import get_args_parser  # Hydra's own parser: the flags it knows

    chosen = [VERBOSITY_FLAGS[w] for w in words if w in VERBOSITY_FLAGS]
    words = [w for w in words if w not in VERBOSITY_FLAGS]
    parsed, unknown = get_args_parser().parse_known_args(words)
    late = [w for w in unknown if not w.startswith("-")]
    flags = list(words)
    for override in [*parsed.overrides, *late]:
        flags.remove(override)
    overrides = [*parsed.overrides, *late, *[f"verbosity={v}" for v in chosen[-1:]]]
    return parsed, overrides, flags


def _command_line(
    overrides: list[str], flags: list[str], task: Callable, prog: str, want_help: bool
) -> list[str]:
    """The arguments Hydra gets: the job named after the command and, on ``--help``, the command's own help
    page. The overrides come first, then the flags: argparse takes the overrides as one run of words, and a
    flag with an optional value (``--info``) must not eat one."""
    job = prog.replace(" ", "-")
    extra = [] if any(o.startswith("hydra.job.name=") for o in overrides) else [f"hydra.job.name={job}"]
    if want_help:
        from hydra.core.config_store import ConfigStore

        node = {"app_name": prog, "header": "", "footer": "", "template": _help_template(task, prog, job)}
        ConfigStore.instance().store(group="hydra/help", name="rag", node=node, provider="rag")
        extra.append("hydra/help=rag")
    return [*extra, *overrides, *flags]


def hydra_entry(task: Callable[[DictConfig], Any], config_name: str, prog: str) -> Any:
    """Run ``task(cfg)`` under ``@hydra.main`` after checking the command line; returns what it returned
    (the ``objective`` metric where the config names one; a list under ``-m``).

    A :class:`~rag.errors.RagError` ends a single run with one line and exit status 1; under ``-m`` it ends
    only its own run: the error is logged (one line) and the run's value is ``nan`` when an ``objective`` is
    set (a sweeper then ranks it last), else None, and the sweep goes on."""
    from rag.log import configure_logging

    try:
        config_dir = conf_dir()
    except ConfigError as err:
        fail(err)
    argv = list(sys.argv)
    parsed, overrides, flags = _split_command_line(argv[1:])
    shows_only = parsed.help or parsed.hydra_help or parsed.info or parsed.shell_completion
    elsewhere = parsed.config_path or parsed.config_dir or parsed.experimental_rerun
    if not (shows_only or elsewhere):
        check_overrides(parsed.config_name or config_name, overrides, prog, multirun=parsed.multirun)
    results = []

    @hydra.main(version_base="1.3", config_path=config_dir, config_name=config_name)
    def _main(cfg: DictConfig) -> Any:
        hydra_argv, sys.argv = sys.argv, argv  # the task records the command as it was typed
        try:
            configure_logging(cfg.get("verbosity"))
            _log_to_run_file()
            result = task(cfg)
            if cfg.get("objective"):
                result = objective_value(result, str(cfg.objective))
        except RagError as err:
            if not parsed.multirun:
                fail(err)
            log.error(f"this run failed: {err}")
            result = float("nan") if cfg.get("objective") else None
        finally:
            sys.argv = hydra_argv
        results.append(result)
        return result

    sys.argv = [argv[0], *_command_line(overrides, flags, task, prog, want_help=bool(parsed.help))]
    try:
        _main()
    finally:
        sys.argv = argv
    if parsed.multirun:
        return results
    return results[0] if results else None
