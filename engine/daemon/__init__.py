"""The parablock storage daemon: qemu-storage-daemon's command line, QMP server and jobs."""
