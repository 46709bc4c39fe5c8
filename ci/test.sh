#!/usr/bin/env bash
# The README's test command: set up (idempotent), then run the whole suite on every
# usable backend. Extra arguments go to pytest (e.g. `ci/test.sh -m parity`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh --test
exec .venv/bin/python -m pytest "$@"
