"""Where the Hydra configs are: the repository's top-level ``conf/`` in a source checkout or an editable
install (edits take effect at once), else the copy a wheel ships as ``rag/conf`` (see setup.py)."""

from __future__ import annotations

from pathlib import Path

from rag.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> str:
    """The absolute path of the config folder (it holds ``train.yaml``): ``<repo>/conf`` when the package
    is imported from a checkout (its parent holds ``setup.cfg`` and ``conf/``), else ``<package>/conf``."""
    repo = PACKAGE.parent
    if (repo / "setup.cfg").is_file() and (repo / "conf" / "train.yaml").is_file():
        return str(repo / "conf")
    installed = PACKAGE / "conf"
    if (installed / "train.yaml").is_file():
        return str(installed)
    raise ConfigError(
        f"no config folder: neither {repo / 'conf'} nor {installed} holds train.yaml; "
        "reinstall the package (pip install .) or run from a checkout"
    )
