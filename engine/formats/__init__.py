"""Image formats and protocol drivers.

A driver module registers its classes with ``engine.driver.register`` when it is imported.  Importing
this package imports nothing else: ``load(name)`` imports the module of one format and ``load_all()``
every driver module (probing and listing formats need them all).  A command that names its formats
(``convert -f raw -O qcow2``) pays only for those: importing every module, the checker's tables
included, cost about 25 ms of every command's start-up.
"""
import importlib as _importlib

#: format name -> the module of this package that registers it
DRIVER_MODULES = {
    "file": "file",
    "raw": "raw",
    "qcow2": "qcow2",
    "qed": "qed",
    "vdi": "vdi",
    "vhdx": "vhdx",
    "vmdk": "vmdk",
    "vpc": "vpc",
}


def load(name: str) -> None:
    """Import the module registering format ``name`` (nothing for an unknown name)."""
    mod = DRIVER_MODULES.get(name)
    if mod is not None:
        _importlib.import_module(f"{__name__}.{mod}")


def load_all() -> None:
    for mod in DRIVER_MODULES.values():
        _importlib.import_module(f"{__name__}.{mod}")
