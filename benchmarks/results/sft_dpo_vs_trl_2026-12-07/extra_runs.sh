#!/bin/bash
# Third SFT pair and an rlhf SFT run with oneDNN off, alternated, uptime at each.
R=/work/main/benchmarks/results/sft_dpo_vs_trl_2026-12-07; S=/work/main/benchmarks/sft_dpo_vs_trl.py; D=$R/data
export OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false
run() { name=$1; shift; echo "== $name: $(uptime)"; timeout 400 "$@" --json $R/$name.json > $R/$name.log 2>&1; echo "rc=$? after: $(uptime)"; }
run sft_rlhf_3 env PYTHONPATH=/work/wt/sftdpo /work/main/.venv/bin/python $S rlhf --stage sft --data $D --steps 4
run sft_trl_3 /work/venv-trl/bin/python $S trl --stage sft --data $D --steps 4
run sft_rlhf_noonednn_1 env PYTHONPATH=/work/wt/sftdpo /work/main/.venv/bin/python $S rlhf --stage sft --data $D --steps 4 --no-onednn
