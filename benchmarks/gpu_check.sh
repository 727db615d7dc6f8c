#!/usr/bin/env bash
# The explanation benchmark at 1 mm brain size on a CUDA GPU (issues 4 and 18), in about 5 minutes.
#
# Network: nnU-Net's 3d_fullres-sized PlainConvUNet for 1 mm brains (6 stages, 32-320 features, 128^3 patch),
# He-initialized; instances: the ground-truth lesions of the phantom case with the most lesions. Every method's
# first call is a warm-up outside its figures (Captum's too).
#   1. mean aggregation, 2 samples, MEAN_INSTANCES instances: the study's way (whole-window graph, float32)
#      versus Captum NoiseTunnel(Saliency) and ours in float32 (cuDNN's algorithm search on and off) and with fp16
#      autocast (goal: >= 3x faster than the study's way in float32, <= 1/4 of its peak memory); float32 means
#      float32 (no TF32);
#   2. seconds per instance at N = 50 samples, one fold without mirroring, float32 and AMP;
#   3. the default nnU-Net prediction, FOLDS folds with mirroring (TTA): seconds per instance and sample in
#      float32 and fp16 (times N for N samples: every sample repeats the same passes);
#   4. one tile's forward and backward per precision and memory layout (benchmarks/tile_precision.py).
# Each step has a time limit (STEP_SECONDS); figures are printed and written as JSON to $OUT. Run from anywhere;
# PYTHON defaults to the repository's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WORKDIR=${WORKDIR:-/tmp/nnxai-benchmark-1mm}
OUT=${OUT:-benchmarks/results-gpu}
MEAN_INSTANCES=${MEAN_INSTANCES:-10}
AMP=${AMP:-bf16,fp16}
FOLDS=${FOLDS:-5}
STEP_SECONDS=${STEP_SECONDS:-200}
mkdir -p "$OUT"
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "gpu_check.sh: no CUDA GPU visible to torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
common=(--workdir "$WORKDIR" --spacing 1 --case most --device cuda --features "32,64,128,256,320,320" --convs 2
        --patch 128 --threads 4)
step() { timeout "$STEP_SECONDS" "$PYTHON" "$@" || echo "gpu_check.sh: step failed or ran past ${STEP_SECONDS} s: $*"; }
step -m benchmarks.explain_benchmark "${common[@]}" --parts mean --samples 2 --instances "$MEAN_INSTANCES" \
    --ours-amp fp16 --json "$OUT/mean.json"
step -m benchmarks.explain_benchmark "${common[@]}" --parts amp --instances 2 --samples 50 --amp "$AMP" \
    --json "$OUT/n50.json"
step -m benchmarks.explain_benchmark "${common[@]}" --parts amp --instances 2 --samples 1 --amp fp16 \
    --folds "$FOLDS" --tta --json "$OUT/ensemble.json"
step -m benchmarks.tile_precision --json "$OUT/tile.json"
