#!/usr/bin/env bash
# Train the built-in toyfaces-64 generator on one CUDA GPU in one go, then gather what to score.
#
#   bash training/train-gpu.sh OUT_DIR [MINUTES]        # MINUTES of training per run (default 7)
#
# A 64² StyleGAN2 this small should be launch-bound on a datacenter GPU (a training step is ~20k
# PyTorch op calls, counted on CPU; not yet timed on a GPU): one process would leave the GPU mostly
# idle, and a larger batch cost about the same time per step. So three runs go side by side, one
# process each, and the GPU's lever is the batch:
#   b256       fresh, 256 images per step
#   b512       fresh, 512 images per step
#   warm-b256  the shipped model (600 kimg of CPU training) continued at 256 per step
# R1's weight and G_ema's half-life follow the batch (StyleGAN2-ADA's scaling). Each run renders
# the 200k real pool up front (--prerender-workers) and stops resumably after MINUTES; its full
# state stays in WORK_DIR. OUT_DIR gets logs.tar (the logs and each run's last sample grid) and,
# per run, its final G_ema + D and its snapshot nearest 60% of its images as
# generator-RUN-KIMGk.safetensors: seven files of at most 8 MB, so that they fit a link that
# carries 8 files of 16 MiB. Score them where faiss is installed:
#   python bench/generator_quality.py --snapshots OUT_DIR
# Needs the project importable by $PYTHON (default python3) with torch, numpy, pydantic,
# safetensors, typer and rich; DEVICE=cpu runs the same script (slowly) anywhere.
set -uo pipefail
out=${1:?usage: bash training/train-gpu.sh OUT_DIR [MINUTES]}
minutes=${2:-7}
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}
work=${WORK_DIR:-/tmp/labelfoundry-train}
workers=${PRERENDER_WORKERS:-5}
snap=${SNAPSHOT_KIMG:-100}
pool=${REAL_POOL:-200000}  # a dry run anywhere: DEVICE=cpu REAL_POOL=512 SNAPSHOT_KIMG=0.1 bash training/train-gpu.sh /tmp/t 0.3
logs=$out/logs
mkdir -p "$logs" "$work"
export PYTHONUNBUFFERED=1 COLUMNS=160 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread per process, renderers included
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } > "$logs/gpu.txt"

train() {  # train NAME ARGS...
    local name=$1; shift
    "$py" -m flows.cli train-generator --out "$work/$name" --device "$dev" --kimg 100000 --max-minutes "$minutes" \
        --threads 1 --prerender-workers "$workers" --snapshot-kimg "$snap" --real-pool "$pool" "$@" > "$logs/$name.log" 2>&1
    echo "$name: rc $?" >> "$logs/$name.log"
}
t0=$SECONDS
train b256 --batch 256 &
train b512 --batch 512 &
train warm-b256 --batch 256 --init-from labelfoundry/assets/toyfaces-64.safetensors &
wait
echo "all runs: $((SECONDS - t0)) s" | tee -a "$logs/gpu.txt"

"$py" - "$work" "$out" <<'EOF'
import json, shutil, sys
from pathlib import Path

from safetensors import safe_open

work, out = Path(sys.argv[1]), Path(sys.argv[2])
for run in ("b256", "b512", "warm-b256"):
    d = work / run
    snaps = sorted(d.glob("generator-*k.safetensors"))
    final = d / "generator.safetensors"
    if not final.exists():
        print(f"{run}: no export", flush=True)
        continue
    with safe_open(str(final), "pt") as f:
        kimg = json.loads(f.metadata()["extra"])["kimg"]
    shutil.copyfile(final, out / f"generator-{run}-{int(kimg):06d}k.safetensors")
    if snaps:  # the snapshot nearest 60% of the way (a constant-rate run can peak before its end)
        start = int(snaps[0].stem.split("-")[1][:-1])
        mid = min(snaps, key=lambda p: abs(int(p.stem.split("-")[1][:-1]) - (start + 0.6 * (kimg - start))))
        if mid.stem.split("-")[1] != f"{int(kimg):06d}k":
            shutil.copyfile(mid, out / f"generator-{run}-{mid.stem.split('-')[1]}.safetensors")
    grid = d / "samples-final.png"
    if grid.exists():
        shutil.copyfile(grid, out / "logs" / f"{run}-samples-final.png")
    print(f"{run}: {kimg:.0f} kimg, {len(snaps)} snapshots", flush=True)
EOF
tar -C "$out" -cf "$out/logs.tar" logs && rm -r "$logs"
ls -la "$out"
