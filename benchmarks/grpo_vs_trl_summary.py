"""Summarise a `benchmarks/grpo_vs_trl.sh` sitting: one markdown row per run, then the ratio
of the medians of TRL's and rlhf's step times (each run's own median over its timed steps)
over the numbered runs; the CPU-time runs (`*_cpu`) are listed with their CPU seconds.
    python benchmarks/grpo_vs_trl_summary.py benchmarks/results/grpo_vs_trl_<date>
"""

import json
import statistics
import sys
from pathlib import Path


def main() -> None:
    out = Path(sys.argv[1])
    loads = {}
    for line in (out / "log.txt").read_text().splitlines():
        name, when = line.split()[0], line.split()[1]
        loads.setdefault(name, []).append(line.split("load ")[1].split()[0])
    medians = {"rlhf": [], "trl": []}
    print("| run | median step s | timed steps s | generation s | median step CPU s | load 1-min before/after |")
    print("|---|---|---|---|---|---|")
    for path in sorted(out.glob("*.json"), key=lambda p: (p.stem[-1], p.stem)):
        try:
            r = json.loads(path.read_text())
        except ValueError:
            print(f"| {path.stem} | (no result) | | | | |")
            continue
        kind = "trl" if "trainer" in r else "rlhf"
        if path.stem[-1].isdigit():  # the alternated wall-time runs; *_cpu runs are shown only
            medians[kind].append(r["median_step_s"])
        cpu = f"{r['median_step_cpu_s']:.1f}" if "median_step_cpu_s" in r else ""
        generation = r["phases"]["generation"]["median_s"] if kind == "rlhf" else r["median_generation_s"]
        timed = [f"{t:.1f}" for t in r["step_times_s"][1:]]
        print(f"| {path.stem} | {r['median_step_s']:.1f} | {', '.join(timed)} | {generation:.1f} | {cpu} | "
              f"{' / '.join(loads.get(path.stem, []))} |")
    if medians["rlhf"] and medians["trl"]:
        rlhf, trl = statistics.median(medians["rlhf"]), statistics.median(medians["trl"])
        print(f"\nrlhf {rlhf:.1f} s, TRL {trl:.1f} s: TRL / rlhf = {trl / rlhf:.2f}")


if __name__ == "__main__":
    main()
