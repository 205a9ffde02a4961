"""``parablock batch``: many conversions and backups from one manifest, on one machine or on Dask.

``manifest`` reads and validates the file, ``item`` runs one item (skip check, copy, verify), ``runner``
runs a manifest locally under one shared worker pool and writes the state and the report,
``dask_runner`` runs the same items on a Dask cluster, ``progress`` is the one progress display.
"""
