"""parablock's IPC layer: the executor interface between the coordinator and whoever moves the bytes.

May import only the standard library (and msgpack, once the wire codec lands).
"""
