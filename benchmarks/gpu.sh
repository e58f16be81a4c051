#!/usr/bin/env bash
# Every GPU check and benchmark of jqlora in one run, correctness first, each part time-boxed
# so that a slow or failing part still leaves the others their turn.
#
#     bash benchmarks/gpu.sh [OUTDIR]        # one log per part under OUTDIR (default gpu-results)
#
# Parts, in order: the machine; the GPU kernel tests (compiled, not interpreted, against a
# float64 reference); the train step (benchmarks/train_step_gpu.py); the fused matmul table
# (benchmarks/qmatmul.py, Llama-2-7B shapes); host-offloaded optimizer state
# (benchmarks/offload_memory.py). Set SCALE=2 to double every time limit.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
scale=${SCALE:-1}

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, log to OUTDIR/NAME.log
    local name=$1 limit=$(($2 * scale)) start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "   rc=$rc ($([ $rc = 124 ] && echo 'timed out' || echo done)) after $((SECONDS - start)) s"
}

part machine 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv;
    $py -c 'import jax, jaxlib; print(\"jax\", jax.__version__, jaxlib.__version__, jax.devices())'"
part kernel_tests 90 $py -m pytest -q -n 0 -p no:cacheprovider tests/test_kernels_on_gpu.py
part train_step 300 $py benchmarks/train_step_gpu.py --shape smollm2-135m,llama-1b \
    --batch 8x1024 --rows jqlora,peft-lora,jqlora-pallas,jqlora-scan --timeout 120
part qmatmul 100 $py benchmarks/qmatmul.py --models 7B --backward --reps 10 --m 1 16 4096
part offload 60 $py benchmarks/offload_memory.py --steps 3

for name in machine kernel_tests train_step qmatmul offload; do
    echo "---- $name.log (last lines)"
    tail -n 16 "$out/$name.log" | cut -c 1-400
done
