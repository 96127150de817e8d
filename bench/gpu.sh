#!/usr/bin/env bash
# The factory's speed figures on one CUDA GPU, in one go (budget: under 8 minutes on a datacenter GPU;
# the steps' limits add up to 7 min 40 s).
#
#   bash bench/gpu.sh [OUT_DIR]          # default OUT_DIR: runs/gpu-bench
#
# Needs the project importable by $PYTHON (default python3): `pip install -e .` on the GPU worker.
# Each step has its own time limit, so one slow step cannot eat the others' time; a step that fails
# or runs out is recorded as such in OUT_DIR/summary.json and the script goes on. What it measures:
#   throughput-64   bench/throughput.py at 64² (the shipped toyfaces-64): gen_sps, label_sps,
#                   commit_sps and the reader, one worker, batch 64, 4,096 samples
#   throughput-64-compiled  the same with the torch.compile'd labeling pass (--compile; Triton), 2,048
#   throughput-256  the same at 256² (a random StyleGAN2 of that size, same work per image), batch 16
#   labeling-256    bench/labeling.py: generator vs naive hypercolumn vs ours (fp32, bf16) at 256²
#   labeling-512    the same at 512², batch 1 (the papers' resolution)
# Each step's log and its last JSON line land in OUT_DIR; summary.json collects the JSON lines.
set -uo pipefail
out=${1:-runs/gpu-bench}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: $py sees no CUDA device; run it on a GPU worker" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1 || true

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc $rc, $((SECONDS - t0)) s"
    { tail -n 1 "$out/$name.log" | "$py" -c "import json,sys; json.loads(sys.stdin.read())" 2>/dev/null \
        && tail -n 1 "$out/$name.log" || echo '{"error": "rc '"$rc"' (124: over its '"$limit"' s limit), see '"$name"'.log"}'; } \
        > "$out/$name.json"
}

step throughput-64 120 "$py" bench/throughput.py --device cuda --workers 1 --torch-threads 4 --batch 64 --n 4096 --samples-per-shard 256
step throughput-64-compiled 90 "$py" bench/throughput.py --device cuda --workers 1 --torch-threads 4 --batch 64 --n 2048 --samples-per-shard 256 --no-read --compile
step throughput-256 100 "$py" bench/throughput.py --device cuda --workers 1 --torch-threads 4 --batch 16 --n 512 --res 256 --samples-per-shard 64
step labeling-256 90 "$py" bench/labeling.py --device cuda --res 256 --batch 4
step labeling-512 60 "$py" bench/labeling.py --device cuda --res 512 --batch 1

"$py" - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
summary = {"gpu": (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else None}
for name in ("throughput-64", "throughput-64-compiled", "throughput-256", "labeling-256", "labeling-512"):
    p = out / f"{name}.json"
    summary[name] = json.loads(p.read_text()) if p.exists() else {"error": "not run"}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary))
EOF
