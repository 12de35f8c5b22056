"""One module per family of stage kinds. Importing this package imports every module in it, which
defines (and so registers) every stage kind: a new kind needs no list to be added to."""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
