"""Image formats and protocol drivers.  Importing this package registers every driver: each module
of the package registers its classes with ``engine.driver.register`` when imported."""
import importlib as _importlib
import pkgutil as _pkgutil

for _mod in sorted(m.name for m in _pkgutil.iter_modules(__path__)):
    _importlib.import_module(f"{__name__}.{_mod}")
