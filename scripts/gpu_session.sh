#!/usr/bin/env bash
# Issue 11's GPU checks in one command, sized for one device `run` (600 s) of a 15-minute
# lease (docs/benchmarks.md). The H200 image has torch 2.11 / torchvision 0.26 but not all
# of ctlesion's dependencies, and nothing can be fetched there, so they travel as wheels:
#
#   here, once:        bash scripts/gpu_session.sh wheels        # -> .whl/ (ignored by git, ~13 MB)
#   there (device run, carry [".whl"]):   bash scripts/gpu_session.sh
#   a CPU dry run of the plumbing:        DEVICE=cpu SIZE=64 STEPS=1 REPEATS=1 bash scripts/gpu_session.sh
#
# Writes logs and JSON to $OUT (gpu-out/ when unset): the new tests on torch 2.11, per-slice
# inference at batch 1 and 32 (fp32, bf16) against stock, and joint training iterations/s.
set -u
if [ "${1:-}" = wheels ]; then
  exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    pycocotools pydicom nibabel highdicom pylibjpeg pylibjpeg-libjpeg pyjpegls
fi
DEVICE=${DEVICE:-cuda}; SIZE=${SIZE:-512}; STEPS=${STEPS:-20}; REPEATS=${REPEATS:-20}
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
run() {   # run NAME SECONDS CMD...: the command's output to the screen and $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name ($limit s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n 6 "$OUT/$name.log"; echo "== $name: exit $rc"
}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, torchvision, ctlesion; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
run tests 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_roi_align_grad.py tests/test_fast_inference.py
run infer_b1 90 $PY -m ctlesion benchmark --device "$DEVICE" --size "$SIZE" --models ssm-2branch-r18-s3,maskrcnn-r18-s2 \
  --repeats "$REPEATS" --warmup 3 --quiet --json "$OUT/infer_b1.json"
run infer_b32 90 $PY -m ctlesion benchmark --device "$DEVICE" --size "$SIZE" --models ssm-2branch-r18-s3 --batch 32 \
  --repeats "$REPEATS" --warmup 2 --quiet --json "$OUT/infer_b32.json"
run infer_b32_bf16 90 $PY -m ctlesion benchmark --device "$DEVICE" --size "$SIZE" --models ssm-2branch-r18-s3 --batch 32 \
  --precision bf16 --repeats "$REPEATS" --warmup 2 --quiet --json "$OUT/infer_b32_bf16.json"
run train_joint 150 $PY scripts/bench_train.py --joint --device "$DEVICE" --amp bf16 --model ssm-2branch-r18-s3 \
  --size "$SIZE" --batches 1,8 --steps "$STEPS"
