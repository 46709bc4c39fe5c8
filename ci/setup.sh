#!/usr/bin/env bash
# Set up everything xpnn needs on a fresh machine (Debian/Ubuntu, Python >= 3.10):
# Debian's Fashion-MNIST package (the offline default data set) and a virtual
# environment in .venv with xpnn installed in editable mode.
#   ci/setup.sh          runtime only (training)
#   ci/setup.sh --test   plus the test extras: pytest, array-api-strict, scikit-learn,
#                        PyTorch 2.13.0 (CPU build; the reference), CuPy (to test the
#                        clear error on machines without a usable CUDA device), and mpi4py
#                        with MPICH (data-parallel training; the tests run mpiexec -n 2)
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

say() { printf '[setup] %s\n' "$*" >&2; }

install_fashion_mnist() {
  if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    return
  fi
  local sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
  if command -v apt-get >/dev/null; then
    say "installing Debian's dataset-fashion-mnist"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    say "no apt-get: give Fashion-MNIST with --data-dir DIR (the four IDX files)"
  fi
}

make_venv() {
  local python="${PYTHON:-python3}"
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($python --version)"
    "$python" -m venv .venv
  fi
}

pip_install() {
  # A local wheel directory (where the machine has one) holds the CPU build of
  # torch; looking there first avoids downloading a multi-GB CUDA build.
  local links=()
  [ -d /opt/wheels ] && links=(--find-links /opt/wheels)
  # (pip warns about index folders of this machine that do not exist: noise, dropped.)
  .venv/bin/python -m pip install -q --disable-pip-version-check "${links[@]}" "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

install_fashion_mnist
make_venv
if [ "$with_tests" = 1 ]; then
  say "installing xpnn with test extras (PyTorch CPU 2.13.0, CuPy, mpi4py + MPICH)"
  pip_install -e ".[test,torch,gpu,mpi]"
else
  say "installing xpnn"
  pip_install -e .
fi
