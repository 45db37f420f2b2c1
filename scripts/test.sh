#!/usr/bin/env bash
# Run the test suite (CPU only; multi-process tests use torchrun + gloo), listing the 20 slowest tests so a
# slow CI run shows where the time went. Extra arguments go to pytest: -m "not slow" skips the multi-process
# and multi-step runs.
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh" "test"
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider --durations=20 "$@"
