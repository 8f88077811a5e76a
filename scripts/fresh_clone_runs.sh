#!/usr/bin/env bash
# The README's first command from a fresh clone, then the efficiency report and a small sweep on its outputs.
# Prerequisites: git, python3 >= 3.10, PyPI reachable; ~25 min on 2 quiet cores. Run it alone on the machine:
#   bash scripts/fresh_clone_runs.sh /path/to/kdengine /tmp/x-evals scripts/results
# Writes RESULTS/demo_cpu/ (summary.*, fresh_clone.log), RESULTS/bench_demo/ (report.*), RESULTS/sweep_demo/.
set -euo pipefail
src=$1; clone=$2; results=$(realpath "$3")
log() { echo "$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg) | $*" | tee -a "$results/demo_cpu/fresh_clone.log"; }
mkdir -p "$results/demo_cpu" "$results/bench_demo" "$results/sweep_demo"
: > "$results/demo_cpu/fresh_clone.log"
rm -rf "$clone"
log "git clone $src $clone ($(git -C "$src" rev-parse --short HEAD))"
git clone -q "$src" "$clone"
cd "$clone"
# a source worktree with a detached HEAD (as /work/main is) clones as that old commit: take its main branch
git checkout -q -B main origin/main
log "checked out main at $(git rev-parse --short HEAD)"
t0=$(date +%s)
log "bash scripts/install.sh && .venv/bin/kdengine demo"
bash scripts/install.sh
t1=$(date +%s)
log "install done in $((t1 - t0)) s"
.venv/bin/kdengine demo
t2=$(date +%s)
log "demo done in $((t2 - t1)) s; first command in all $((t2 - t0)) s"
cp demo-out/summary.md demo-out/summary.json demo-out/summary.png "$results/demo_cpu/"
cp -r demo-out "$clone-demo-out"  # kept for later measurements (the clone itself may be replaced)
if .venv/bin/kdengine bench --model demo-out/teacher --model demo-out/train/final --model demo-out/train_ce/final \
    --distill-run demo-out --out bench-out; then
  log "bench done in $(( $(date +%s) - t2 )) s"
  cp bench-out/report.md bench-out/report.json bench-out/report.png "$results/bench_demo/"
else log "bench FAILED"; fi
t3=$(date +%s)
if .venv/bin/kdengine sweep --config "$results/sweep_demo/sweep.yaml"; then
  log "sweep done in $(( $(date +%s) - t3 )) s"
  cp sweep-out/summary.md sweep-out/summary.csv sweep-out/cells.csv sweep-out/*.png "$results/sweep_demo/"
else log "sweep FAILED"; fi
