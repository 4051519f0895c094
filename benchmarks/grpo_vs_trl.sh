#!/bin/bash
# GRPO step time on identical work, rlhf against TRL's GRPOTrainer, alternated in one sitting
# (rlhf, TRL, rlhf, TRL), with the load average logged before and after each run.
#   bash benchmarks/grpo_vs_trl.sh OUT_DIR [TIMED_STEPS]
# TRL runs from its own environment ($TRL_PYTHON, default /work/venv-trl/bin/python).
set -u
cd "$(dirname "$0")/.."
OUT=$1; STEPS=${2:-3}
TRL_PYTHON=${TRL_PYTHON:-/work/venv-trl/bin/python}
mkdir -p "$OUT"
log() { echo "$1 $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/log.txt"; }
for i in $(seq 1 ${PAIRS:-2}); do
  log "rlhf_$i before"
  PYTHONPATH=$PWD timeout 900 .venv/bin/python -m rlhf bench --steps $((STEPS + 1)) --json \
    ppo.algo=grpo rollout.samples_per_prompt=4 reward.model=null \
    reward.function=benchmarks.grpo_reward:letter_share ppo.kl_coef=0.04 train.threads=2 \
    > "$OUT/rlhf_$i.json" 2> "$OUT/rlhf_$i.err"
  log "rlhf_$i after (rc $?)"
  log "trl_$i before"
  timeout 900 "$TRL_PYTHON" benchmarks/trl_grpo.py --steps "$STEPS" --threads 2 --beta 0.04 \
    > "$OUT/trl_$i.json" 2> "$OUT/trl_$i.err"
  log "trl_$i after (rc $?)"
done
