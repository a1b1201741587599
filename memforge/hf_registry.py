"""``import memforge`` lets exported models (``memforge export``) load without remote code.

Their config class registers with transformers' ``AutoConfig`` as soon as transformers' Auto config mapping is
imported (at once when it already is); the model class registers when such a config is first built
(``training.memory_lm_config``). Until then nothing is imported: memforge's own processes that never load an
exported model pay no import of torch models for it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

WATCHED = "transformers.models.auto.configuration_auto"
CONFIG_MODULE = "memforge.training.memory_lm_config"
log = logging.getLogger("memforge")


def _register() -> None:
    try:
        importlib.import_module(CONFIG_MODULE)
    except Exception as exc:  # never break the user's import of transformers
        log.warning("memforge: exported models need trust_remote_code=True here: registering them with "
                    "transformers failed (%s: %s)", type(exc).__name__, exc)


class _RegisterAfter(importlib.abc.Loader):
    """Runs the watched module's own loader, then registers."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register()


class _WatchTransformers(importlib.abc.MetaPathFinder):
    """Finds the watched module through the other finders, with a loader that registers after it runs."""

    def find_spec(self, name, path, target=None):
        if name != WATCHED:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


def install() -> None:
    """Register now when transformers' Auto mapping is loaded, else when it is."""
    if WATCHED in sys.modules:
        _register()
    elif not any(isinstance(finder, _WatchTransformers) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WatchTransformers())
