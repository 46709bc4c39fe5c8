#!/usr/bin/env bash
# GPU check: run as is on a CUDA machine, from the repository root.
#
# It installs nothing from the network. Where CuPy and PyTorch are already
# installed and array-api-compat / array-api-strict are missing, put their
# wheels in .whl/ (pip download them elsewhere) and this script unpacks them
# into a private folder. It prints the GPU, driver, CUDA, CuPy and PyTorch
# versions, runs the backend-parity suite on CuPy and PyTorch-CUDA, then the GPU
# benchmark (xpnn on CuPy against PyTorch on CUDA), and exits non-zero on any
# parity or GPU test failure.
#   OUT=dir ci/gpu-check.sh      also writes parity.log, gpu-tests.log and bench-gpu.json into dir
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ls .whl/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 2
  export PYTHONPATH="$PYTHONPATH:$site"
fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
python3 - <<'PY'
import importlib
for name in ("numpy", "cupy", "torch", "array_api_compat", "array_api_strict"):
    try:
        module = importlib.import_module(name)
        print(f"{name:18} {module.__version__}")
    except Exception as error:
        print(f"{name:18} missing ({error})")
try:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print(f"{'GPU':18} {props['name'].decode()}")
    print(f"{'CUDA runtime':18} {cupy.cuda.runtime.runtimeGetVersion()}")
    print(f"{'CUDA driver':18} {cupy.cuda.runtime.driverGetVersion()}")
except Exception as error:
    print(f"CuPy cannot reach a GPU: {error}")
try:
    import torch
    print(f"{'torch CUDA':18} {torch.version.cuda} available={torch.cuda.is_available()}")
except Exception:
    pass
PY

echo "== parity suite on the GPU backends (numpy is the reference)"
python3 -m pytest -q -p no:cacheprovider -m parity -k "cupy or torch-cuda or numpy" tests 2>&1 | tee "$out/parity.log"
parity_status=${PIPESTATUS[0]}

echo "== GPU tests beyond parity (every test on the cupy backend)"
python3 -m pytest -q -p no:cacheprovider -k "cupy" tests 2>&1 | tee "$out/gpu-tests.log" | tail -n 15
gpu_tests_status=${PIPESTATUS[0]}

echo "== GPU benchmark: xpnn on CuPy vs PyTorch on CUDA"
python3 scripts/bench.py --backend gpu --iterations 100 --json "$out/bench-gpu.json" || echo "benchmark failed"

status=0
if [ "$parity_status" -ne 0 ]; then
  echo "PARITY FAILED (pytest exit $parity_status)"
  status=1
fi
if [ "$gpu_tests_status" -ne 0 ]; then
  echo "GPU TESTS FAILED (pytest exit $gpu_tests_status; see gpu-tests.log)"
  status=1
fi
[ "$status" -eq 0 ] && echo "parity and GPU tests passed"
exit "$status"
