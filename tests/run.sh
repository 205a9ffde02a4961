#!/usr/bin/env bash
# Install everything the tests need (Debian's qemu-utils for the interop oracles, the Python test
# dependencies) and run the whole suite in parallel.  This is the README's test command; .ci/run calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1 \
    || ! command -v nbdinfo >/dev/null 2>&1 || ! command -v nbdcopy >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-utils libnbd-bin >/dev/null
fi
# qemu-storage-daemon (Debian's qemu-system-common) is the oracle of the daemon tests: unpack just the
# binary into .cache/ when it is not installed
if ! command -v qemu-storage-daemon >/dev/null 2>&1 && [ ! -x .cache/qsd/usr/bin/qemu-storage-daemon ]; then
  mkdir -p .cache/qsd
  ( cd .cache && { apt-get download qemu-system-common >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && apt-get download qemu-system-common >/dev/null 2>&1; }; } \
      && dpkg -x qemu-system-common_*.deb qsd && rm -f qemu-system-common_*.deb ) \
    || echo "tests/run.sh: could not fetch qemu-storage-daemon; the side-by-side daemon tests will skip" >&2
fi
python3 -m pip install -q -e '.[test]'
exec python3 -m pytest -n auto -q "$@"
