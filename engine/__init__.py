"""parablock's engine: the coordinator layer.

Holds errors and types, the BlockDriver protocol and registry, image formats (file, raw, qcow2) and the
CLI composition root.  May import ``ipc``; only the composition roots (``engine.cli``) import ``workers``.
"""
