#!/bin/bash
# Runs the benchmark settings recorded in benchmarks/RESULTS.md; one JSON file each under
# benchmarks/results/ (or $OUT), with the load average before and after in log.txt.
#   bash benchmarks/run.sh [STEPS] [extra key=value ...]
set -u
cd "$(dirname "$0")/.."
STEPS=${1:-5}; shift || true
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
run() {
  name=$1; shift
  echo "$name: $(date -u +%FT%TZ) load before $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/log.txt"
  .venv/bin/rlhf bench --steps "$STEPS" --json "$@" 2>/dev/null > "$OUT/$name.json"
  echo "  after $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/log.txt"
}
# The TRL comparison's work: fixed-length generation, fp32, full fine-tuning, separate critic.
run fp32 "$@"
# The same work with every switchable speed lever off (torch's MKL matmuls, unpacked
# decoding, multinomial sampling, a separate no-grad scoring pass, the per-operation AdamW,
# large blocks unmapped when freed).
run fp32_levers_off model.onednn_matmul=false rollout.packed_decoding=false ppo.reuse_rollout_forward=false \
    ppo.fused_adamw=false rollout.inverse_cdf_sampling=false train.keep_freed_memory=false "$@"
# Recommended fast settings: bf16 autocast, LoRA, value head on the policy's trunk.
run bf16_lora_value_head model.dtype=bfloat16 model.lora=true model.value_head=true "$@"
# bf16 and LoRA with the separate critic.
run bf16_lora model.dtype=bfloat16 model.lora=true "$@"
# Memory: full fine-tuning with the element-wise operations recomputed in the backward pass.
run fp32_selective_checkpointing model.gradient_checkpointing=selective "$@"
# Memory: full fine-tuning with every layer recomputed in the backward pass.
run fp32_checkpointing model.gradient_checkpointing=true "$@"
