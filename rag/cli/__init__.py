"""Thin Hydra entry points. Configs live in the repository's top-level ``conf/`` folder; a wheel ships a
copy as ``rag/conf`` (:func:`rag.config_dir.conf_dir` picks the one in use, when a command starts)."""


def __getattr__(name: str):
    # CONF_DIR is found on first use, not at import: a broken install fails in the command, with one line
    if name == "CONF_DIR":
        from rag.config_dir import conf_dir

        return conf_dir()
    raise AttributeError(f"module 'rag.cli' has no attribute {name!r}")
