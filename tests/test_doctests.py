"""The docstring examples of ``lightning_attn.functional`` run as tests.

Project rule for ``functional/`` (pure maths): every public function has a doctest ``Example:`` section. This
runs each module's doctests (as ``pytest --doctest-modules lightning_attn/functional`` would) and checks that
no public function is left without one.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import lightning_attn.functional as functional

MODULES = sorted(
    f"{functional.__name__}.{info.name}" for info in pkgutil.iter_modules(functional.__path__) if not info.ispkg
)


def public_functions(module: ModuleType) -> dict[str, object]:
    """Functions defined in ``module`` that are public: listed in ``__all__``, or without a leading underscore."""
    names = getattr(module, "__all__", None) or [name for name in vars(module) if not name.startswith("_")]
    return {
        name: obj
        for name in names
        if inspect.isfunction(obj := getattr(module, name)) and obj.__module__ == module.__name__
    }


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(module, name)
    for test in tests:
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} failing docstring examples in {name} (output above)"

    with_examples = {test.name.rsplit(".", 1)[-1] for test in tests if test.examples}
    functions = public_functions(module)
    missing = sorted(set(functions) - with_examples)
    assert not missing, f"public functions of {name} without a doctest example: {missing}"
    no_section = sorted(fn for fn, obj in functions.items() if "Example:" not in (inspect.getdoc(obj) or ""))
    assert not no_section, f"public functions of {name} without an 'Example:' docstring section: {no_section}"


def test_every_module_is_checked() -> None:
    assert f"{functional.__name__}.attention" in MODULES and f"{functional.__name__}.calibration" in MODULES
