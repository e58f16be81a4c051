#!/usr/bin/env bash
# Every GPU check and benchmark of jqlora in one run (under 8 minutes on one GPU),
# correctness first, each part time-boxed so that a slow or failing part still leaves the
# others their turn; every row is printed as it finishes.
#
#     bash benchmarks/gpu.sh [OUTDIR] [--smoke]   # logs per part under OUTDIR (default gpu-results)
#
# Parts, in order: the machine; the GPU kernel tests (compiled kernels against float64);
# the --tune sweep (prints a gpu_tiles.TABLES entry); the qmatmul table (Llama-2 7B and 70B
# shapes, M = 1, 4, 16, 64, 1024, 4096, forward and backward, against bf16 dot and
# dequantize-then-dot); the train step beside PEFT LoRA (SmolLM2-135M and a 1B config,
# batch 8 x 1024); host-offloaded optimizer state. --smoke runs every part tiny on a CPU
# (Pallas interpreted): it checks the script, its numbers mean nothing. SCALE=2 doubles
# every time limit.
set -u
out=gpu-results
smoke=0
for arg in "$@"; do
    case $arg in
        --smoke) smoke=1 ;;
        *) out=$arg ;;
    esac
done
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
scale=${SCALE:-1}
start_all=$SECONDS

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, its lines as they come
    local name=$1 limit=$(($2 * scale)) start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep --line-buffered -E \
        '^(\||\{|tune|correctness|forward|backward|FAILED|.*(passed|failed|timed out))'
    rc=${PIPESTATUS[0]}
    echo "   rc=$rc ($([ "$rc" = 124 ] && echo 'timed out' || echo done)) after $((SECONDS - start)) s"
}

if [ $smoke = 1 ]; then
    export JAX_PLATFORMS=cpu
    part machine 30 $py -c 'import jax, jaxlib; print("| jax", jax.__version__, jaxlib.__version__, jax.devices(), "|")'
    part kernel_tests 300 $py -m pytest -q -n 0 -p no:cacheprovider tests/test_kernels_gpu.py -k "lowers or operations"
    part qmatmul 600 $py benchmarks/qmatmul.py --smoke --tune --backward
    part train_step 600 $py benchmarks/train_step_gpu.py --shape tiny --batch 2x64 \
        --rows jqlora,jqlora-scan --steps 3 --warmup 1 --timeout 280
    part offload 300 $py benchmarks/offload_memory.py --shape tiny --steps 2
else
    part machine 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
        $py -c 'import jax, jaxlib; print(\"| jax\", jax.__version__, jaxlib.__version__, jax.devices(), \"|\")'"
    part kernel_tests 60 $py -m pytest -q -n 0 -p no:cacheprovider tests/test_kernels_on_gpu.py
    part tune 70 $py benchmarks/qmatmul.py --tune --models 7B --m 1 4 16 64 1024 --reps 3 --no-table
    part qmatmul 110 $py benchmarks/qmatmul.py --backward --reps 5 --m 1 4 16 64 1024 4096 \
        --methods jqlora,dot,deq+dot
    part train_step 170 $py benchmarks/train_step_gpu.py --shape smollm2-135m,llama-1b \
        --batch 8x1024 --rows jqlora-scan,peft-lora,jqlora --steps 8 --warmup 2 --timeout 80
    part offload 40 $py benchmarks/offload_memory.py --steps 3
fi
echo "== all parts: $((SECONDS - start_all)) s; logs under $out/"
