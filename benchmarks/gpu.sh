#!/usr/bin/env bash
# The GPU measurements of docs/performance.md in one run (about 5 minutes on one H200):
#   OUT=gpu-results bash benchmarks/gpu.sh
# 1. the CUDA-only tests (device hygiene: no host syncs, pinned memory; attribution on CUDA
#    against the CPU);
# 2. python -m benchmarks (floor, measure with each alignment, naive) for vgg16 and resnet50
#    at 224 px on CUDA;
# 3. python -m benchmarks.attribution (seconds per image vs layer calls) at 224 and 64 px;
# 4. the README's main command and shiftlab attribute end to end on CUDA, timed.
# Each step has its own time limit and log; everything ends up in $OUT/gpu-results.tar.gz and
# the step summary in $OUT/steps.txt. Runs from a checkout (no install needed).
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT/work"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" SHIFTLAB_OFFLINE=1 MPLBACKEND=Agg \
    PYTHONUNBUFFERED=1
W="$OUT/work"

step() {  # step NAME LIMIT_S COMMAND...: run, log, and record its exit code and seconds
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$W/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
    tail -n 25 "$W/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, torchvision, platform; print('python', platform.python_version(),
'torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  nproc; git log -1 --format='commit %h %cs' 2>/dev/null; } | tee "$W/machine.txt"

step tests 150 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
    tests/test_device_hygiene.py tests/test_attribution.py
for model in vgg16 resnet50; do
    step "bench-$model" 120 python3 -m benchmarks --model "$model" --size 224 --grid 4 \
        --images 8 --device cuda --memory-shifts '' --json "$W/bench-$model.json"
done
step attribution 150 python3 -m benchmarks.attribution --models vgg16,resnet50 \
    --sizes 224,64 --images 4 --batch-size 4 --device cuda --json "$W/attribution.json"
step cli-heatmap 90 python3 -m shiftlab heatmap --model vgg16 --weights none --device cuda \
    --out "$W/heatmap-vgg16" --format png
step cli-attribute 90 python3 -m shiftlab attribute --model vgg16 --weights none \
    --device cuda --out "$W/attribute-vgg16" --format png
tar -czf "$OUT/gpu-results.tar.gz" -C "$OUT" work
cp "$W/machine.txt" "$OUT/machine.txt"
