#!/usr/bin/env bash
# Set up (if needed) and run the test suite on CPU: everything (what CI runs), or with --fast the tests not marked
# slow (under 4 minutes on a 2-core machine). Other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow" "$@"
fi
python -m pytest -q "$@"
