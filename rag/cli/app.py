"""What every command shares: the config check before Hydra runs, Hydra's entry point, one-line errors.

Each ``rag-*`` command is ``hydra_entry(run, config_name, prog)`` around a ``run(cfg)`` that parses its config,
calls the library (:mod:`rag.build`, :mod:`rag`) and reports; a :class:`~rag.errors.RagError` raised anywhere
below is caught here once and printed as one line, with exit status 1.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from rag.cli import CONF_DIR
from rag.errors import RagError


def fail(err: Exception) -> None:
    """Print a known error as one message and exit with status 1 (no stack trace)."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    sys.exit(1)


CONFIG_HINT = (
    "hint: keys are listed by `{prog} --cfg job`, a group's options are the files in {conf}/<group>/; "
    "a key the config does not have is added with a leading + (`+key=value`) only on purpose"
)


def check_overrides(config_name: str, overrides: Sequence[str], prog: str) -> None:
    """Compose the config once before Hydra runs, so that a typo (unknown key or group option) fails at once
    with Hydra's message and a short hint, before anything is loaded."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    plain = [o for o in overrides if not o.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name=config_name, overrides=plain)
    except (HydraException, OmegaConfBaseException) as err:
        message = str(err).strip()
        unknown = re.match(r"Could not override '([^']+)'", message)
        if unknown:
            message += "\n" + _unknown_key_line(config_name, plain, unknown.group(1))
        print(
            f"error: {message}\n{CONFIG_HINT.format(prog=prog, conf=CONF_DIR)}", file=sys.stderr, flush=True
        )
        sys.exit(2)


def _unknown_key_line(config_name: str, overrides: Sequence[str], key: str) -> str:
    """ "the config has no key X", with the closest keys of its parent node when the rest composes."""
    from hydra import compose, initialize_config_dir

    line = f"the config has no key '{key}'"
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
    parent, _, name = key.rpartition(".")
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        keys = list(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:  # the suggestion is a courtesy: the error itself is reported either way
        keys = []
    close = difflib.get_close_matches(name, [str(k) for k in keys], n=3)
    if close:
        line += " (did you mean " + ", ".join(f"'{parent + '.' if parent else ''}{c}'" for c in close) + "?)"
    return line


def hydra_entry(task, config_name: str, prog: str) -> None:
    """Run ``task(cfg)`` under ``@hydra.main`` after checking the overrides (unless Hydra flags are given)."""
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):
        check_overrides(config_name, args, prog)

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def _main(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except RagError as err:
            fail(err)

    _main()
