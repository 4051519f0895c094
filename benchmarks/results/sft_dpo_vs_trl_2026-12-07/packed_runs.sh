#!/bin/bash
# SFT with packing on both sides (rows of up to 256 tokens), 1 warm-up + 1 timed step each, uptime at each.
R=/work/main/benchmarks/results/sft_dpo_vs_trl_2026-12-07; S=/work/main/benchmarks/sft_dpo_vs_trl.py; D=$R/data
export OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
run() { name=$1; shift; echo "== $name: $(uptime)"; timeout 300 "$@" --json $R/$name.json > $R/$name.log 2>&1; echo "rc=$? after: $(uptime)"; }
run sft_packed_rlhf_1 env PYTHONPATH=/work/wt/sftdpo /work/main/.venv/bin/python $S rlhf --stage sft --data $D --steps 2 --packing
run sft_packed_trl_1 /work/venv-trl/bin/python $S trl --stage sft --data $D --steps 2 --packing
