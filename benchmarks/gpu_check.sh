#!/usr/bin/env bash
# The device check, prepared for a session that is lent a GPU (one H100/H200; the device tool's `run`).
#
#   part "kernels" (~6 min): the Triton kernel tests compiled for real (not interpreted).
#   part "bench"   (~6 min): the MoE, attention and dense-GEMM benchmarks at gpt-oss-120b shapes.
#   part "engine"  (~7 min): CUDA-graph tests, then `gptoss bench latency` on full-size random 120b weights
#                             (batch-1 decode at 1k and 32k context, prefill of 1k and 8k prompts).
#
# Usage from the device tool (carry .whl: the GPU image lacks fastapi/uvicorn/pydantic (llguidance is optional:
# without it only structured outputs are off); see
# ../shared/device-wheels-py312/README.md):
#   bash benchmarks/gpu_check.sh kernels|bench|engine   (one device-tool run each)
# Logs, JSON and PNGs go to $OUT (the device tool's folder) or benchmarks/out. Copy the tables into
# benchmarks/RESULTS.md with the device, date, commit and command.
set -uo pipefail
part=${1:-kernels}
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# The checkout as the `gptoss` namespace without installing it: one folder of links, gptoss/<folder> -> <folder>.
src=/tmp/gptoss-src
mkdir -p "$src/gptoss"
for folder in engine kernels server scripts benchmarks; do ln -sfn "$PWD/$folder" "$src/gptoss/$folder"; done
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$src
else
    export PYTHONPATH=$src
fi
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device_$part.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device_$part.txt"

run() {  # run NAME TIMEOUT_S COMMAND...: one step, its log kept even when it fails or times out
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "=== $name: exit $?"
    tail -n 40 "$out/$name.log"
}

case "$part" in
kernels)
    run test_kernels 200 python3 -m pytest -q -x tests/test_moe_kernel.py tests/test_attention_kernel.py tests/test_norm_kernel.py
    run test_matmul 250 python3 -m pytest -q -x tests/test_matmul_kernel.py
    ;;
bench)
    run bench_moe 120 python3 -m benchmarks.bench_moe --out "$out" --iters 10
    run bench_attention 150 python3 -m benchmarks.bench_attention --out "$out" --iters 10
    run bench_matmul 150 python3 -m benchmarks.bench_matmul --out "$out" --iters 10
    ;;
engine)
    run test_cuda_graphs 150 python3 -m pytest -q -x tests/test_cuda_graphs.py tests/test_llm.py
    run bench_latency_120b 360 python3 -m gptoss.scripts.cli bench latency --random-weights --preset gpt-oss-120b \
        --batch-sizes 1 --input-lens 1024,8192,32768 --output-lens 64 --iters 2 --max-model-len 40960
    ;;
*)
    echo "unknown part $part: kernels, bench or engine" >&2
    exit 2
    ;;
esac
