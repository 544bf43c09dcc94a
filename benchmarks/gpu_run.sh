#!/usr/bin/env bash
# One device session: the GPU benchmark, then the GPU tests, output under $OUT (the device tool's
# folder). Needs .gpu/ from benchmarks/gpu_bundle.sh. Run from the repository root:
#   bash benchmarks/gpu_run.sh    (GPU_ARGS=--skip-resnet50, TEST_K=augment, BENCH_S/TEST_S: limits)
# RN50_ARGS (e.g. "--skip-dct"): after the tests, a third part, `gpu.py --skip-convnext $RN50_ARGS`
# (limit RN50_S, 170 s), into $OUT/gpu-rn50.md; each part writes its tables as it finishes them.
OUT=${OUT:-/tmp/gpu-out}; mkdir -p $OUT
export PYTHONPATH=$PWD/.gpu/site:$PWD LD_LIBRARY_PATH=$PWD/.gpu/libs ZOO_DATA_DIR=/tmp/zoo-bench
export ZOO_JPEG_REGION_LIB=$PWD/.gpu/libs/jpeg_region.so  # built by gpu_bundle.sh (the machine may lack cc/libjpeg)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "cores: $(nproc)"
python3 -c "import torch, lightning, timm, numba, numpy; print(torch.__version__, lightning.__version__, timm.__version__, numba.__version__, numpy.__version__)"
t0=$(date +%s)
timeout ${BENCH_S:-330} python3 benchmarks/gpu.py --images 12800 --steps 40 --warmup 12 ${GPU_ARGS:-} --out $OUT/gpu.md > $OUT/gpu.log 2>&1
echo "gpu.py rc=$? in $(( $(date +%s) - t0 )) s"
grep -v -i -E "warn|^\s*$" $OUT/gpu.log | tail -45
t1=$(date +%s)
timeout ${TEST_S:-170} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py ${TEST_K:+-k "$TEST_K"} -rA > $OUT/pytest.log 2>&1
echo "pytest rc=$? in $(( $(date +%s) - t1 )) s"
grep -E "PASSED|FAILED|ERROR|passed|failed|Error" $OUT/pytest.log | tail -25
if [ -n "${RN50_ARGS+x}" ]; then
  t2=$(date +%s)
  timeout ${RN50_S:-170} python3 benchmarks/gpu.py --images 12800 --steps 40 --warmup 12 --skip-convnext $RN50_ARGS --out $OUT/gpu-rn50.md > $OUT/gpu-rn50.log 2>&1
  echo "gpu.py (ResNet-50) rc=$? in $(( $(date +%s) - t2 )) s"
  grep -v -i -E "warn|^\s*$" $OUT/gpu-rn50.log | tail -20
fi
