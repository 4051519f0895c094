#!/bin/bash
# `rlhf bench` (default: SmolLM2 full fine-tuning, fp32, PPO) under two torch builds,
# alternated (A, B, A, B), with the load average logged before and after each run.
#   bash benchmarks/torch_versions.sh OUT_DIR PYTHON_A PYTHON_B [STEPS]
set -u
cd "$(dirname "$0")/.."
OUT=$1; A=$2; B=$3; STEPS=${4:-4}
mkdir -p "$OUT"
log() { echo "$1 $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/log.txt"; }
for i in 1 2; do
  for side in A B; do
    py=${!side}
    name="torch$("$py" -c 'import torch; print(torch.__version__.split("+")[0].replace(".", ""))')_$i"
    log "$name before"
    PYTHONPATH=$PWD timeout 900 "$py" -m rlhf bench --steps "$STEPS" --json > "$OUT/$name.json" 2> "$OUT/$name.err"
    log "$name after (rc $?)"
  done
done
