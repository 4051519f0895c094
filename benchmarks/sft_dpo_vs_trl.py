"""SFT and DPO training throughput of `rlhf` against TRL's SFTTrainer and DPOTrainer.

Same data, model and settings on both sides: SmolLM2-135M-Instruct, fp32, full fine-tuning,
no gradient checkpointing, batch 8, max length 256, 2 torch threads, loss on completion
tokens only; DPO: beta 0.1, sigmoid loss, a frozen reference model run on every batch (not
precomputed). Throughput is real (non-pad) tokens processed per second of optimiser step,
forward + backward + update; DPO counts the chosen and the rejected sequence (prompt
included) of every pair. The first step is a warm-up and is not timed.

Subcommands:
  data DIR                         write the deterministic data (sft.jsonl, dpo.jsonl)
  rlhf --stage sft|dpo ...         one run of `rlhf` (the SFTTrainer/DPOTrainer of rlhf.sft/rlhf.dpo,
                                   as `rlhf sft|dpo` builds them); run with the rlhf venv
  trl  --stage sft|dpo ...         one run of TRL; run with the TRL venv
  all  --out DIR                   data, then rlhf and TRL alternated (rlhf, TRL, rlhf, TRL) for
                                   SFT then DPO, each with a timeout, `uptime` noted at each run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = Path("~/.cache/rlhf/models/smollm2-135m-instruct").expanduser()
REPO = Path(__file__).resolve().parents[1]
RLHF_PYTHON = str(REPO / ".venv" / "bin" / "python")
RLHF_TREE = str(REPO)
TRL_PYTHON = os.environ.get("TRL_PYTHON", "/work/venv-trl/bin/python")  # a venv with trl==1.16 and the same torch
THREADS = 2
BATCH = 8
MAX_LENGTH = 256

WORDS = ("the river model light garden paper stone quiet number window value simple train market "
         "engine cloud summer letter question answer kitchen music travel winter forest system city "
         "careful bright small large early later reason story result measure signal").split()


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


def write_data(out: Path, n: int = 256) -> None:
    """sft.jsonl: prompt/completion (about 60-130 tokens with the chat template);
    dpo.jsonl: prompt/chosen/rejected, the two responses different."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(out / "sft.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": _sentence(rng, 6, 20), "completion": _sentence(rng, 15, 60)}) + "\n")
    with open(out / "dpo.jsonl", "w") as f:
        for _ in range(n):
            prompt, chosen = _sentence(rng, 6, 20), _sentence(rng, 15, 50)
            rejected = _sentence(rng, 15, 50)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def _summary(side: str, stage: str, packing: bool, steps: list[dict], extra: dict) -> dict:
    """steps: per timed step {"tokens", "seconds"}."""
    tokens, seconds = sum(s["tokens"] for s in steps), sum(s["seconds"] for s in steps)
    return {"side": side, "stage": stage, "packing": packing, "batch_size": BATCH, "max_length": MAX_LENGTH,
            "threads": THREADS, "timed_steps": len(steps), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "mean_step_s": seconds / len(steps), "steps": steps, **extra}


# --------------------------------------------------------------------------------------
# rlhf side
# --------------------------------------------------------------------------------------


def run_rlhf(stage: str, data: Path, steps: int, packing: bool, out: Path, onednn: bool = True,
             share_prompt: bool = True) -> None:
    import torch
    import yaml

    from rlhf.config import load_config

    if stage == "sft":
        from rlhf.sft import SFTTrainer as Trainer
        data_cfg = {"train": str(data / "sft.jsonl"), "eval_fraction": 0.0, "max_length": MAX_LENGTH,
                    "packing": packing, "completion_only_loss": True}
        extra: dict = {"lr": 2.0e-5}
    else:
        from rlhf.dpo import DPOTrainer as Trainer
        data_cfg = {"train": str(data / "dpo.jsonl"), "eval_fraction": 0.0, "max_length": MAX_LENGTH,
                    "max_prompt_tokens": 128}
        extra = {"lr": 1.0e-6}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {"model": {"policy": str(MODEL), "lora": False, "dtype": "float32", "gradient_checkpointing": False,
                         "onednn_matmul": onednn},
               "data": data_cfg,
               "train": {"out_dir": tmp, "steps": steps, "batch_size": BATCH, "threads": THREADS, "report": False,
                         "progress": False, "eval_every": 0, "save_every": 0, "seed": 0, **extra}}
        if stage == "dpo":
            cfg["dpo"] = {"beta": 0.1, "loss": "sigmoid", "share_prompt": share_prompt}
        (Path(tmp) / "bench.yaml").write_text(yaml.safe_dump(cfg))
        trainer = Trainer(load_config(Trainer.config_cls, str(Path(tmp) / "bench.yaml"), []))
        rows = []
        try:
            last = time.perf_counter()
            for _ in range(steps):
                row = trainer.step_once()
                now = time.perf_counter()
                rows.append({"tokens": round(row["throughput/tokens_per_s"] * row["time/step_s"]),
                             "seconds": row["time/step_s"], "seconds_end_to_end": now - last,
                             "loss": row["train/loss"]})
                last = now
        finally:
            trainer.engine.end()
    timed = rows[1:]
    result = _summary("rlhf", stage, packing, timed, {"onednn_matmul": onednn, "share_prompt": share_prompt,
        "warmup_step": rows[0], "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "tokens_per_s_end_to_end": sum(r["tokens"] for r in timed) / sum(r["seconds_end_to_end"] for r in timed),
        "attn_implementation": trainer.unwrapped_policy().config._attn_implementation})
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))


# --------------------------------------------------------------------------------------
# TRL side
# --------------------------------------------------------------------------------------


def _trl_datasets(stage: str, data: Path):
    """The same records in TRL's conversational form (the prompt a user message, rendered
    with the chat template as rlhf renders it)."""
    from datasets import Dataset

    if stage == "sft":
        recs = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["completion"]}]} for r in _read(data / "sft.jsonl")]
    else:
        recs = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in _read(data / "dpo.jsonl")]
    return Dataset.from_list(recs)


def run_trl(stage: str, data: Path, steps: int, packing: bool, out: Path) -> None:
    import torch
    torch.set_num_threads(THREADS)
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    marks: list[tuple[float, float, int]] = []  # (step begin, step end, tokens so far) per step
    state = {"tokens": 0, "begin": 0.0}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            state["begin"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            marks.append((state["begin"], time.perf_counter(), state["tokens"]))

    def counting(cls):
        class Counting(cls):
            def training_step(self, model, inputs, *a, **kw):
                mask = inputs.get("attention_mask")
                state["tokens"] += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
                return super().training_step(model, inputs, *a, **kw)
        return Counting

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    load = lambda: AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)  # noqa: E731
    model = load()
    common = dict(max_steps=steps, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                  lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                  optim="adamw_torch_fused", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
                  logging_steps=10_000, save_strategy="no", eval_strategy="no", report_to=[],
                  dataloader_num_workers=0, seed=0, disable_tqdm=True, max_length=MAX_LENGTH)
    with tempfile.TemporaryDirectory() as tmp:
        if stage == "sft":
            args = trl.SFTConfig(output_dir=tmp, learning_rate=2.0e-5, packing=packing, completion_only_loss=True,
                                 **common)
            trainer = counting(trl.SFTTrainer)(model=model, args=args, train_dataset=_trl_datasets(stage, data),
                                              processing_class=tokenizer, callbacks=[Clock()])
        else:
            args = trl.DPOConfig(output_dir=tmp, learning_rate=1.0e-6, beta=0.1, loss_type=["sigmoid"],
                                 precompute_ref_log_probs=False, **common)
            trainer = counting(trl.DPOTrainer)(model=model, ref_model=load(), args=args,
                                              train_dataset=_trl_datasets(stage, data), processing_class=tokenizer,
                                              callbacks=[Clock()])
        trainer.train()
    rows, prev_tokens = [], 0
    for i, (begin, end, tokens) in enumerate(marks):
        rows.append({"tokens": tokens - prev_tokens, "seconds": end - begin,
                     "seconds_end_to_end": end - marks[i - 1][1] if i else None})
        prev_tokens = tokens
    timed = rows[1:]
    result = _summary("trl", stage, packing, timed, {
        "warmup_step": rows[0], "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "trl": trl.__version__, "transformers": transformers.__version__,
        "tokens_per_s_end_to_end": sum(r["tokens"] for r in timed) / sum(r["seconds_end_to_end"] for r in timed),
        "attn_implementation": model.config._attn_implementation})
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}, indent=2))


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------


def command(side: str, stage: str, data: Path, steps: int, packing: bool, out: Path) -> tuple[list[str], dict]:
    python = RLHF_PYTHON if side == "rlhf" else TRL_PYTHON
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    if side == "rlhf":
        env["PYTHONPATH"] = RLHF_TREE
    cmd = [python, os.path.abspath(__file__), side, "--stage", stage, "--data", str(data), "--steps", str(steps),
           "--json", str(out)] + (["--packing"] if packing else [])
    return cmd, env


def run_all(out: Path, plan: list[tuple[str, bool, int]], repeats: int, timeout: int) -> None:
    data = out / "data"
    write_data(data)
    log = []
    for stage, packing, steps in plan:
        for rep in range(repeats):
            for side in ("rlhf", "trl"):
                name = f"{stage}{'_packed' if packing else ''}_{side}_{rep + 1}"
                cmd, env = command(side, stage, data, steps, packing, out / f"{name}.json")
                load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                print(f"== {name}: {load}", flush=True)
                start = time.time()
                try:
                    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
                    rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
                except subprocess.TimeoutExpired:
                    rc, tail = "timeout", ""
                (out / f"{name}.log").write_text(tail)
                entry = {"run": name, "uptime_before": load, "rc": rc, "wall_s": time.time() - start,
                         "uptime_after": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
                if rc == 0:
                    r = json.loads((out / f"{name}.json").read_text())
                    entry.update(tokens_per_s=r["tokens_per_s"], mean_step_s=r["mean_step_s"],
                                 tokens_per_s_end_to_end=r["tokens_per_s_end_to_end"])
                print(json.dumps(entry), flush=True)
                log.append(entry)
                (out / "runs.json").write_text(json.dumps(log, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("dir", type=Path)
    for side in ("rlhf", "trl"):
        s = sub.add_parser(side)
        s.add_argument("--stage", choices=("sft", "dpo"), required=True)
        s.add_argument("--data", type=Path, required=True)
        s.add_argument("--steps", type=int, default=6, help="optimiser steps, the first a warm-up")
        s.add_argument("--packing", action="store_true")
        s.add_argument("--json", type=Path, required=True)
        if side == "rlhf":
            s.add_argument("--no-onednn", action="store_true", help="model.onednn_matmul=false (torch's kernels)")
            s.add_argument("--no-share-prompt", action="store_true", help="dpo.share_prompt=false")
    a = sub.add_parser("all")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--sft-steps", type=int, default=6)
    a.add_argument("--dpo-steps", type=int, default=5)
    a.add_argument("--repeats", type=int, default=2)
    a.add_argument("--timeout", type=int, default=600, help="seconds per run")
    a.add_argument("--packed-row", action="store_true", help="also SFT with packing on both sides")
    args = p.parse_args()
    if args.cmd == "data":
        write_data(args.dir)
    elif args.cmd == "rlhf":
        run_rlhf(args.stage, args.data, args.steps, args.packing, args.json, onednn=not args.no_onednn,
                 share_prompt=not args.no_share_prompt)
    elif args.cmd == "trl":
        run_trl(args.stage, args.data, args.steps, args.packing, args.json)
    else:
        plan = [("sft", False, args.sft_steps), ("dpo", False, args.dpo_steps)]
        if args.packed_row:
            plan.append(("sft", True, args.sft_steps))
        run_all(args.out, plan, args.repeats, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
