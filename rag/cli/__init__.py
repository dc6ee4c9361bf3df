"""Thin Hydra entry points. Configs live in the repository's top-level ``conf/`` folder; a wheel ships a
copy as ``rag/conf`` (:func:`rag.config_dir.conf_dir` picks the one in use)."""

from rag.config_dir import conf_dir

CONF_DIR = conf_dir()
