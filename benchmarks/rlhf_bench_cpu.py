"""`rlhf bench`, with each step's CPU time (user + system, all threads of the process) beside
its wall time: on a machine shared with other jobs the wall time of a step grows with the
load, its CPU time much less, so CPU seconds compare two trainers run at different loads.
    PYTHONPATH=$PWD .venv/bin/python benchmarks/rlhf_bench_cpu.py --steps 4 [overrides ...]
Prints one JSON object: the bench's result with `step_cpu_s` (every step) and
`median_step_cpu_s` (the steps after the first) added.
"""

import argparse
import contextlib
import io
import json
import statistics
import time

from rlhf import bench
from rlhf.ppo import PPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    cpu_times: list[float] = []
    step_once = PPOTrainer.step_once

    def timed_step_once(self):
        t = time.process_time()
        try:
            return step_once(self)
        finally:
            cpu_times.append(time.process_time() - t)

    PPOTrainer.step_once = timed_step_once
    with contextlib.redirect_stdout(io.StringIO()):
        result = bench.run_bench(None, args.overrides, args.steps, as_json=True)
    result["step_cpu_s"] = cpu_times
    result["median_step_cpu_s"] = statistics.median(cpu_times[1:])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
