"""The `rlhf` command: parses, dispatches, prints errors (never a deep traceback for bad input)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


STOPPED = 75
"""Exit status of a run stopped by a signal once its checkpoint is saved (EX_TEMPFAIL: try
again, i.e. `--resume`); a job script can requeue on it."""


def _ppo(args) -> int:
    from rlhf.config import Config
    from rlhf.ppo import PPOTrainer

    code, _ = _train(_trainer(PPOTrainer, Config, args), "ppo")
    return code


def _trainer(trainer_cls, config_cls, args):
    """A new run from CONFIG.yaml and overrides (`--overwrite` replaces a run in its
    train.out_dir), or the run in --resume RUN_DIR continued, with overrides."""
    from rlhf.config import UserInputError, load_config

    command = args.command
    if args.resume:
        if args.config is not None or args.overwrite:
            raise UserInputError(f"rlhf {command} --resume RUN_DIR takes overrides only (no CONFIG.yaml, no --overwrite)")
        return trainer_cls.resume(Path(args.resume), overrides=args.overrides)
    if args.config is None and not args.overrides:
        raise UserInputError(f"rlhf {command}: give a CONFIG.yaml (or key=value settings) or --resume RUN_DIR")
    return trainer_cls(load_config(config_cls, args.config, args.overrides), overwrite=args.overwrite)


def _train(trainer, command: str):
    """(exit status, what `train()` returned): STOPPED, with how to continue, when a signal
    stopped the run."""
    try:
        result = trainer.train()
    finally:
        trainer.engine.end()  # destroys the process group under `accelerate launch`
    if trainer.stop_signal is not None:
        if trainer.engine.is_main:  # once, not once per process
            resume = f"rlhf {command} --resume {trainer.out_dir}"
            if trainer.engine.world > 1:
                resume = f"the same launch command with -m {resume}"
            print(f"rlhf {command}: stopped by {trainer.stop_signal} after step {trainer.step}, checkpoint saved; "
                  f"continue with: {resume}", file=sys.stderr)
        return STOPPED, result
    return 0, result


def _reward_model(args) -> None:
    from rlhf.config import load_config
    from rlhf.reward_model import RewardModelConfig, train_reward_model

    cfg = load_config(RewardModelConfig, args.config, args.overrides)
    metrics = train_reward_model(cfg)
    print(json.dumps(metrics, indent=2))


def _offline(trainer_cls, args) -> int:
    """`rlhf sft` and `rlhf dpo`: the last metrics row is printed at the end."""
    trainer = _trainer(trainer_cls, trainer_cls.config_cls, args)
    is_main = trainer.engine.is_main
    code, row = _train(trainer, args.command)
    if code == 0 and is_main:
        print(json.dumps(row, indent=2))
    return code


def _sft(args) -> int:
    from rlhf.sft import SFTTrainer

    return _offline(SFTTrainer, args)


def _dpo(args) -> int:
    from rlhf.dpo import DPOTrainer

    return _offline(DPOTrainer, args)


def _demo(args) -> None:
    if args.overrides[:1] == ["grpo"]:  # `rlhf demo grpo [key=value ...]`: the verifiable-reward demo
        from rlhf.demo_grpo import run_grpo_demo

        run_grpo_demo(out_dir=args.out, overrides=args.overrides[1:])
        return
    from rlhf.demo import run_demo

    run_demo(out_dir=args.out, overrides=args.overrides)


def _report(args) -> None:
    from rlhf.report import write_report

    path = write_report(Path(args.run_dir))
    print(path)


def _bench(args) -> None:
    from rlhf.bench import run_bench

    run_bench(config=args.config, overrides=args.overrides, steps=args.steps, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description="Align a causal language model with RLHF: PPO or A2C against a reward model "
        "or function, a frozen reference and a critic; Bradley-Terry reward models from rankings; "
        "supervised fine-tuning and DPO.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("reward-model", help="train a reward model from preference pairs or rankings (Bradley-Terry)")
    p.add_argument("config", nargs="?", help="YAML config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.set_defaults(func=_reward_model)

    for name, func, what in (("ppo", _ppo, "train a policy with PPO, A2C, GRPO, RLOO or REINFORCE++"),
                             ("sft", _sft, "supervised fine-tuning on demonstrations (chats or prompt/completion)"),
                             ("dpo", _dpo, "direct preference optimisation on preference pairs or rankings")):
        p = sub.add_parser(name, help=f"{what} (rlhf {name} CONFIG.yaml [key=value ...])")
        p.add_argument("config", nargs="?", help="YAML config")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
        p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the run already in train.out_dir (its config, logs, checkpoints and final models)")
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="the embedded default end to end: reward model from human labels, PPO, evaluation; "
                       "`rlhf demo grpo`: GRPO on generated problems with a verifiable reward")
    p.add_argument("overrides", nargs="*", help="`grpo` for the verifiable-reward demo, then dotted.key=value overrides")
    p.add_argument("--out", default=None, help="run directory (default runs/demo, runs/demo-grpo)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("report", help="write report.html and plots for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=_report)

    p = sub.add_parser("bench", help="time PPO steps phase by phase against the machine's floor")
    p.add_argument("config", nargs="?", help="YAML config (default: SmolLM2-135M-Instruct setup)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    p.add_argument("--steps", type=int, default=4, help="PPO steps to run (the first is excluded)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    return end_launched_process(_main(argv))


def end_launched_process(code: int) -> int:
    """Under a multi-process launch (`WORLD_SIZE` > 1), end this process now with `code`, once
    its work is done and its files closed; elsewhere return `code`.

    torch's DistributedDataParallel keeps the gloo process group alive after
    destroy_process_group (its worker threads stay). A worker that is still releasing the
    last collective's tensors when Python shuts down needs the GIL, is refused it, and the
    process aborts ("terminate called without an active exception", SIGABRT) after a run that
    succeeded: about 1 launch in 40 here, always on a process that reached exit first. Leaving
    with os._exit skips that shutdown; output streams and log handlers are flushed first."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value settings after a flag (`CONFIG.yaml --overwrite train.steps=2`) are overrides too:
    # argparse ends a command's positionals at its first flag.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # A config path that looks like an override belongs to the overrides.
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    from rlhf.config import UserInputError

    try:
        code = args.func(args) or 0
    except UserInputError as e:
        print(f"rlhf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from rlhf.errors import NonFiniteError

        if not isinstance(e, NonFiniteError):
            raise
        print(f"rlhf {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"rlhf {args.command}: interrupted", file=sys.stderr)
        return 130
    return code
