"""The registries are complete: what a package defines is in the table the tests run over.

``mmlearn.strategies.STRATEGIES``, ``mmlearn.gradients.RULES`` and ``mmlearn.encoders.ENCODERS``
drive the parametrised tests (``tests/helpers.py``, the encoder contract, the rule properties), so
a strategy, rule or encoder left out of its table would go untested. Each check walks every
module of the package, so a class defined in a new file is found too.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from types import ModuleType

import mmlearn.encoders
import mmlearn.gradients
import mmlearn.strategies
from mmlearn.encoders import ENCODERS, Encoder
from mmlearn.gradients import RULES, Rule, TorchJD
from mmlearn.gradients.torchjd import available as torchjd_available
from mmlearn.strategies import STRATEGIES, MultimodalModule


def defined_subclasses(package: ModuleType, base: type) -> dict[str, type]:
    """Qualified name -> class, for every subclass of ``base`` defined in a module of ``package``
    (``base`` itself excluded)."""
    found: dict[str, type] = {}
    modules = [package.__name__]
    modules += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for name in modules:
        for _, cls in inspect.getmembers(importlib.import_module(name), inspect.isclass):
            if cls.__module__ == name and issubclass(cls, base) and cls is not base:
                found[f"{name}.{cls.__qualname__}"] = cls
    return found


def exported_subclasses(package: ModuleType, base: type) -> dict[str, type]:
    """Name -> class, for every subclass of ``base`` in ``package.__all__`` (``base`` excluded)."""
    members = {name: getattr(package, name) for name in package.__all__}
    return {
        name: obj
        for name, obj in members.items()
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base
    }


def test_every_strategy_is_exported_and_registered() -> None:
    registered = set(STRATEGIES.values())
    exported = exported_subclasses(mmlearn.strategies, MultimodalModule)
    missing = sorted(name for name, cls in exported.items() if cls not in registered)
    assert not missing, f"exported from mmlearn.strategies but not in STRATEGIES: {missing}"
    defined = defined_subclasses(mmlearn.strategies, MultimodalModule)
    unexported = sorted(q for q, cls in defined.items() if cls not in exported.values())
    assert not unexported, f"defined but not exported from mmlearn.strategies: {unexported}"
    # `--model <Name>` finds the class by its name: the key must be it (and exported)
    assert all(cls.__name__ == name for name, cls in STRATEGIES.items()), STRATEGIES
    assert set(STRATEGIES) <= set(mmlearn.strategies.__all__)


def test_every_rule_is_exported_and_in_rules() -> None:
    assert len(set(RULES)) == len(RULES), RULES
    exported = exported_subclasses(mmlearn.gradients, Rule)
    # the TorchJD rule is listed only where its optional library is installed
    optional = set() if torchjd_available() else {TorchJD}
    missing = sorted(
        name for name, cls in exported.items() if cls not in RULES and cls not in optional
    )
    assert not missing, f"exported from mmlearn.gradients but not in RULES: {missing}"
    defined = defined_subclasses(mmlearn.gradients, Rule)
    unexported = sorted(q for q, cls in defined.items() if cls not in exported.values())
    assert not unexported, f"defined but not exported from mmlearn.gradients: {unexported}"
    assert all(rule.__name__ in mmlearn.gradients.__all__ for rule in RULES)


def test_every_encoder_is_registered() -> None:
    assert len(set(ENCODERS.values())) == len(ENCODERS), ENCODERS  # one name per class
    defined = defined_subclasses(mmlearn.encoders, Encoder)
    missing = sorted(q for q, cls in defined.items() if cls not in ENCODERS.values())
    assert not missing, f"Encoder subclasses without @register_encoder: {missing}"


def test_the_encoder_package_imports_every_encoder_module() -> None:
    """Registration happens on import: a module that ``mmlearn/encoders/__init__.py`` does not
    import has its encoders missing from ENCODERS when a config names them (checked in a fresh
    interpreter, where no test has imported the module yet)."""
    code = (
        "import pkgutil, sys, mmlearn.encoders as p\n"
        "print(*[m.name for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')"
        " if m.name not in sys.modules])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert not proc.stdout.split(), f"not imported by mmlearn/encoders/__init__.py: {proc.stdout}"
