#!/usr/bin/env bash
# The README's training command: set up (idempotent), then train LeNet with dropout
# and batch norm on Fashion-MNIST. Extra arguments go to xpnn-train
# (e.g. `ci/train.sh --backend gpu --epochs 10`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
# --overwrite: running this command again starts afresh in runs/lenet instead of
# refusing to replace its checkpoint (use xpnn-train --resume to continue one).
exec .venv/bin/xpnn-train --overwrite "$@"
