"""Block jobs: QEMU's job state machine (``state``), the asyncio job runtime (``job``) and the jobs
(commit, stream, ...), all run by the coordinator with their data moving through the worker pool."""
