#!/usr/bin/env bash
# One prepared GPU run (issue "GPU"): on a bare GPU machine with torch already installed and no
# package registry, install this project without dependencies (plus any pure-Python wheels
# carried along in $WHEELS, e.g. torchdeq's), run the CUDA tests, then benchmark against torchdeq
# on the ch.4 ResNet workload (32x32) and tanh d=256, batch 64, Anderson with ift and phantom,
# rel tol 1e-4. Everything goes under one folder. A dry run on CPU checks it end to end:
#
#     DEVICE=cpu REPEAT=1 bash benchmarks/gpu_run.sh bench-out/gpu-dry-run
#     bash benchmarks/gpu_run.sh "$OUT"            # on the GPU machine
set -euo pipefail
OUT="${1:-gpu-run-out}"
DEVICE="${DEVICE:-cuda}"
REPEAT="${REPEAT:-5}"
BATCH="${BATCH:-64}"
WHEELS="${WHEELS:-wheels}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
start=$(date +%s)
echo "== gpu_run.sh: device $DEVICE, batch $BATCH, repeat $REPEAT, out $OUT, $(date -u)"

"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-index "$WHEELS"/*.whl
fi

"$PYTHON" - "$OUT/environment.json" <<'PY'
import json, platform, sys
import torch
info = {
    "python": platform.python_version(), "torch": torch.__version__,
    "cuda_available": torch.cuda.is_available(),
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "cuda": torch.version.cuda,
    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    "float32_matmul_precision": torch.get_float32_matmul_precision(),
}
try:
    import torchdeq
    info["torchdeq"] = getattr(torchdeq, "__version__", "installed")
except ImportError:
    info["torchdeq"] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PY

echo "== CUDA tests"
set +e
timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs \
    --junitxml="$OUT/cuda-tests.xml"
tests_rc=$?
set -e
echo "CUDA tests exit code: $tests_rc"

echo "== bench against torchdeq"
timeout 300 "$PYTHON" -m implicit bench --device "$DEVICE" --cells resnet,tanh \
    --workloads resnet_c48,tanh_d256 --batch "$BATCH" --solvers anderson \
    --backwards ift,phantom --tol 1e-4 --stop rel --repeat "$REPEAT" --compare torchdeq \
    --out "$OUT/bench"
echo "== done in $(( $(date +%s) - start )) s (tests exit code $tests_rc)"
exit "$tests_rc"
