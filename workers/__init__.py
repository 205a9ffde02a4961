"""parablock's workers: byte movers and CPU work (I/O, compression, zero detection).

May import ``ipc`` and the standard library; never ``engine``.
"""
