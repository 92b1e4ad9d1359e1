"""Head plugins. Every module in this folder is imported here and registers its heads itself,
so a new head family is one new file, with no list to edit."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
