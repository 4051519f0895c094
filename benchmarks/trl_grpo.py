"""Time TRL's GRPOTrainer on the work of `rlhf bench ppo.algo=grpo rollout.samples_per_prompt=4`.

The work: SmolLM2-135M-Instruct (the checkpoint rlhf converted into its cache), 8 prompts x 4
samples a step, 32 new tokens each with no early stop (min_new_tokens = max_new_tokens),
temperature 0.7 without top-k, fp32, full fine-tuning, the k3 KL to a reference model in the
loss (beta), one optimiser step per generation batch (num_iterations 1), the GRPO loss
(each sequence's token mean, then the mean over sequences), gradient checkpointing off, no
vLLM, the same prompts as `rlhf bench` (its BENCH_PROMPTS, under SmolLM2's chat template) and
the same reward function (benchmarks/grpo_reward.py).

Run with a Python that has TRL (not rlhf's environment), from the repository root:
    /work/venv-trl/bin/python benchmarks/trl_grpo.py --steps 4 > out.json
A step is the wall time between consecutive `on_step_end` callbacks (the first from
`on_step_begin`): generation, reference and policy log-probs, reward, loss, backward and the
optimiser step. The first step is the warm-up, excluded from the median.
"""

from __future__ import annotations

import argparse
import contextlib
import ast
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def bench_prompts() -> list[str]:
    """rlhf bench's prompts, read from rlhf/bench.py without importing rlhf (TRL's venv has not
    rlhf's dependencies)."""
    tree = ast.parse((ROOT / "rlhf" / "bench.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "BENCH_PROMPTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("BENCH_PROMPTS not found in rlhf/bench.py")


def timed(fn, times: list):
    """`fn`, appending the wall time of each call to `times`."""
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.append(time.perf_counter() - t)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps after the warm-up step")
    parser.add_argument("--model", default=str(Path.home() / ".cache/rlhf/models/smollm2-135m-instruct"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    import trl
    from trl import GRPOConfig, GRPOTrainer

    from grpo_reward import letter_share

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends, self.cpu_begins, self.cpu_ends = [], [], [], []

        def on_step_begin(self, *a, **k):
            self.begins.append(time.perf_counter())
            self.cpu_begins.append(time.process_time())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())
            print(f"step {len(self.ends)}: {self.ends[-1] - self.begins[-1]:.1f} s", file=sys.stderr, flush=True)

    prompts = bench_prompts()
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts])
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out_dir:
        config = GRPOConfig(
            output_dir=out_dir, max_steps=args.steps + 1, per_device_train_batch_size=32,
            gradient_accumulation_steps=1, num_generations=4, num_iterations=1, max_completion_length=32,
            generation_kwargs={"min_new_tokens": 32}, temperature=0.7, top_k=0, top_p=1.0,
            beta=args.beta, loss_type="grpo", scale_rewards="group", epsilon=0.2, learning_rate=1e-5,
            max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=args.gradient_checkpointing,
            use_vllm=False, model_init_kwargs={"dtype": torch.float32}, report_to="none", save_strategy="no",
            logging_steps=1000, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        )
        timer = StepTimer()
        trainer = GRPOTrainer(model=args.model, reward_funcs=letter_share, args=config, train_dataset=dataset,
                              callbacks=[timer])
        assert trainer.ref_model is not None, "beta > 0 should keep a reference model"
        phases = {"_generate": [], "_generate_and_score_completions": []}
        for name, times in phases.items():
            setattr(trainer, name, timed(getattr(trainer, name), times))
        print("training starts", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its metrics
            trainer.train()
        torch.set_num_threads(args.threads)

    steps = [timer.ends[0] - timer.begins[0]] + [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    inner = [e - b for b, e in zip(timer.begins, timer.ends)]
    print(json.dumps({
        "trainer": "trl.GRPOTrainer", "trl": trl.__version__, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "setup": {"model": args.model, "prompts": len(prompts), "prompts_per_step": 8, "num_generations": 4,
                  "max_completion_length": 32, "min_new_tokens": 32, "temperature": 0.7, "top_k": 0,
                  "beta": args.beta, "loss_type": "grpo", "num_iterations": 1, "dtype": "float32",
                  "gradient_checkpointing": args.gradient_checkpointing, "use_vllm": False,
                  "threads": torch.get_num_threads(), "optim": str(config.optim)},
        "steps_timed": len(steps) - 1,
        "median_step_s": statistics.median(steps[1:]),
        "median_step_inner_s": statistics.median(inner[1:]),
        "step_times_s": steps,
        "step_inner_times_s": inner,
        # CPU time (user + system, all threads) of each step, from on_step_begin to on_step_end.
        "step_cpu_s": [e - b for b, e in zip(timer.cpu_begins, timer.cpu_ends)],
        "median_step_cpu_s": statistics.median(e - b for b, e in list(zip(timer.cpu_begins, timer.cpu_ends))[1:]),
        # Generation alone, and generation + reference/policy log-probs + reward (the rest of
        # a step is the loss forward, backward and optimiser step).
        "median_generation_s": statistics.median(phases["_generate"][1:]),
        "median_generate_and_score_s": statistics.median(phases["_generate_and_score_completions"][1:]),
        "generation_times_s": phases["_generate"],
        "generate_and_score_times_s": phases["_generate_and_score_completions"],
        "load_avg": os.getloadavg(),
    }, indent=2))


if __name__ == "__main__":
    main()
