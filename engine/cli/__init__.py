"""The qemu-img-compatible command line: one module per command, wired together in ``main``.

This package is a composition root: it may import ``workers`` to build an executor.
"""
