#!/usr/bin/env bash
# The README's training command: set up (idempotent), then train LeNet with dropout
# and batch norm on Fashion-MNIST. Extra arguments go to xpnn-train
# (e.g. `ci/train.sh --backend gpu --epochs 10`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
exec .venv/bin/xpnn-train "$@"
