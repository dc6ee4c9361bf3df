"""One error root: every exception class the package defines derives from rag.errors.RagError, and no class
the package defines takes a builtin's name (``ReferenceError`` once did, hiding the builtin)."""

from __future__ import annotations

import builtins
import importlib
import inspect
import pkgutil
import types

import pytest

import rag
from rag.errors import ConfigError, RagError


def library_modules() -> list[types.ModuleType]:
    """Every module of the package but the commands (rag.cli.*), imported."""
    names = sorted(
        m.name
        for m in pkgutil.walk_packages(rag.__path__, "rag.")
        if m.name != "rag.cli" and not m.name.startswith("rag.cli.")
    )
    return [rag, *(importlib.import_module(name) for name in names)]


def own_classes(module: types.ModuleType) -> list[type]:
    """The classes ``module`` defines (not the ones it imports)."""
    return [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]


def bare_errors(module: types.ModuleType) -> list[str]:
    """The exception classes ``module`` defines that do not derive from RagError (warning categories aside)."""
    return [
        f"{module.__name__}.{c.__qualname__}"
        for c in own_classes(module)
        if issubclass(c, BaseException) and not issubclass(c, (RagError, Warning))
    ]


def builtin_shadows(module: types.ModuleType) -> list[str]:
    """The classes ``module`` defines under the name of a builtin (``ReferenceError``, ``TimeoutError``)."""
    return [
        f"{module.__name__}.{c.__qualname__}" for c in own_classes(module) if hasattr(builtins, c.__name__)
    ]


@pytest.fixture(scope="module")
def modules():
    return library_modules()


def test_the_checks_catch_a_bare_error_and_a_shadowed_builtin():
    fake = types.ModuleType("rag.fake")
    exec(
        "from rag.errors import RagError\n"
        "class GoodError(RagError, ValueError): pass\n"
        "class BareError(ValueError): pass\n"
        "class SkippedWarning(UserWarning): pass\n"
        "class ReferenceError(RagError): pass\n"
        "class Plain: pass\n",
        fake.__dict__,
    )
    assert bare_errors(fake) == ["rag.fake.BareError"]
    assert builtin_shadows(fake) == ["rag.fake.ReferenceError"]


def test_the_walk_sees_the_whole_library(modules):
    names = {m.__name__ for m in modules}
    expected = {"rag.errors", "rag.model", "rag.retrieval.errors", "rag.data.arrow", "rag.generation.context"}
    assert expected <= names
    assert not any(n == "rag.cli" or n.startswith("rag.cli.") for n in names)
    errors = [c for m in modules for c in own_classes(m) if issubclass(c, RagError)]
    assert len(errors) > 20


def test_every_package_error_derives_from_rag_error(modules):
    bare = [name for m in modules for name in bare_errors(m)]
    assert not bare, f"derive these from rag.errors.RagError (and the builtin they refine): {bare}"


def test_no_class_takes_a_builtin_name(modules):
    shadows = [name for m in modules for name in builtin_shadows(m)]
    assert not shadows, f"rename these classes, whose names hide builtins: {shadows}"


def test_errors_keep_the_builtins_they_refine():
    from rag.generation.decoding import DecodingError
    from rag.generation.generator import GeneratorNotFoundError
    from rag.model import RagModelError
    from rag.reference import ReferenceModelError

    assert issubclass(ConfigError, ValueError) and issubclass(DecodingError, ValueError)
    assert issubclass(RagModelError, ValueError) and issubclass(GeneratorNotFoundError, OSError)
    assert issubclass(ReferenceModelError, RuntimeError) and issubclass(ReferenceModelError, RagError)
