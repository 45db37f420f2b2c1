#!/usr/bin/env bash
# Run the test suite (CPU only; multi-process tests use torchrun + gloo). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_bootstrap.sh" "test"
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider "$@"
