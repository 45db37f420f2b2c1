# Sourced by run_train.sh and test.sh: make sure a Python with titan_dsv4 installed exists, set $PY.
#   USE_VENV=0          use the current python as it is (you installed the package yourself)
#   VENV=path           virtual environment to create/use (default: .venv in the repository)
#   TORCH_INDEX_URL=url where to get torch when no CUDA GPU is present (e.g. the PyTorch CPU wheel index)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-}"
if [ "${USE_VENV:-1}" = "0" ]; then
  PY="$(command -v python3 || command -v python)"
else
  VENV="${VENV:-$ROOT/.venv}"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY="$VENV/bin/python"
  STAMP="$VENV/.titan_dsv4-$(cat "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha1sum | cut -c1-12)-${EXTRAS:-base}"
  if [ ! -f "$STAMP" ]; then
    echo "titan_dsv4: installing the package${EXTRAS:+ with its $EXTRAS extras} into $VENV (once; a minute or two)" >&2
    if ! command -v nvidia-smi >/dev/null 2>&1; then
      # no CUDA: a pinned CPU build (an unpinned torch may pull a multi-GB CUDA build)
      "$PY" -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
      # the tests run the fused attention kernel under Triton's interpreter; CUDA builds of torch bring
      # their own Triton (a pin here could fight theirs)
      if [ "$EXTRAS" = "test" ]; then "$PY" -m pip install -q "triton==3.8.0"; fi
    fi
    "$PY" -m pip install -q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
    touch "$STAMP"
  fi
fi
export PYTHONUNBUFFERED=1
