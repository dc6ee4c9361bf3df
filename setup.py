"""Everything but the package list lives in setup.cfg. The list is here because setup.cfg cannot add to
``find:``: the top-level ``conf/`` (where the layout keeps the Hydra configs) ships inside the wheel as the
data-only package ``rag.conf``, so an installed ``rag`` finds its configs (``rag.config_dir.conf_dir``).
Data folders (the configs, the mini-wiki, the reference weights) are listed as namespace packages so that
setuptools ships their files (setup.cfg's package_data) without warning about them."""

from setuptools import find_namespace_packages, setup

SKIP = ["*.__pycache__", "__pycache__"]

setup(
    packages=[
        *find_namespace_packages(include=["rag", "rag.*"], exclude=SKIP),
        "rag.conf",
        *(f"rag.conf.{name}" for name in find_namespace_packages("conf", exclude=SKIP)),
    ],
    package_dir={"rag.conf": "conf"},
)
