"""Teaching peft's LoRA dispatch about fourbit layers without importing peft before it is used:
at once when peft is loaded, otherwise right after its first import (importing peft takes
seconds, which a model loaded only for inference should not pay).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["teach_peft"]


def teach_peft() -> None:
    """Make peft give fourbit layers fourbit's LoRA layer (``fourbit.integrations.peft``): now
    when peft is imported, after its first import when it is installed, never otherwise."""
    if "peft" in sys.modules:
        _import_fourbit_peft()
    elif importlib.util.find_spec("peft") is not None and not any(
        isinstance(finder, _AfterImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterImport("peft", _import_fourbit_peft))


def _import_fourbit_peft() -> None:
    """Import ``fourbit.integrations.peft``, which wraps peft's dispatch. It may run inside the
    user's ``import peft``, which must not fail for it: a peft too old for fourbit's LoRA layer is
    left alone (``register_lora`` says why when called), anything else is a warning."""
    try:
        importlib.import_module("fourbit.integrations.peft")
    except ImportError:
        pass
    except Exception as error:  # see the docstring
        warnings.warn(
            f"fourbit could not give peft's LoRA dispatch its layers ({error!r}); "
            "call fourbit.integrations.peft.register_lora on the LoraConfig",
            stacklevel=2,
        )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``name`` is first imported, it wraps the real loader so that
    ``callback`` runs once the module has executed, and then leaves ``sys.meta_path``."""

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _CallbackLoader(spec.loader, self.callback)
        return spec


class _CallbackLoader(importlib.abc.Loader):
    """A module's own loader, with ``callback`` run after the module executed."""

    def __init__(self, loader: Any, callback: Callable[[], None]) -> None:
        self.loader, self.callback = loader, callback

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
