"""Collector study: the SAC agents' width, throughput at 40 tasks against data quality at 2 tasks.

    python speed/collector_widths.py                    # widths 128 (the default) and 64
    python speed/collector_widths.py --widths 128 96 64 --steps 60000

For each width, in one sitting: (1) env steps per second of the whole collector with 40 cheetah-dir-style
tasks (two worker processes of 20 stacked agents, 1,200 steps per task, 200 of them random), and (2) the
cheetah-dir data it makes: both tasks collected for --steps env steps (one worker each, as ensure_data
does), the collectors' final deterministic returns, and the CPU-minutes it took. Writes
results/speed/collector_widths.json. The default width is not changed by this script.
"""
import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import macaw  # noqa: E402
from meta_step import collector_env_steps_per_second, run_collectors  # noqa: E402


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--steps", type=int, default=60_000, help="env steps per task for the data-quality run")
    args = parser.parse_args()
    records = []
    for width in args.widths:
        rate = collector_env_steps_per_second(40, 1200, 200, width)
        wall2, results = run_collectors([[0], [1]], args.steps, 2000, width)
        cpu_min = sum(r[0] for r in results) / 60
        returns = [r[1][0] for r in results]  # task 0 runs forward, task 1 backward
        print(f"width {width}: 40 tasks {rate:.0f} env steps/s; cheetah-dir {args.steps} steps: collectors "
              f"forward {returns[0]:.0f}, backward {returns[1]:.0f}, {wall2 / 60:.1f} min wall, {cpu_min:.1f} CPU-min",
              flush=True)
        records.append(dict(width=width, env_steps_per_s_40_tasks=round(rate, 1), steps=args.steps,
                            collector_forward=round(returns[0], 1), collector_backward=round(returns[1], 1),
                            wall_min=round(wall2 / 60, 2), cpu_min=round(cpu_min, 2)))
    out = ROOT / "results" / "speed" / "collector_widths.json"
    macaw.write_json(out, dict(date=datetime.date.today().isoformat(), commit=macaw.git_commit(),
                               seeds="task 0 seed 0, task 1 seed 1 (as ensure_data)", records=records))
    print(f"wrote {out}; mean return per CPU-minute: " + ", ".join(
        f"width {r['width']}: {np.mean([r['collector_forward'], r['collector_backward']]) / r['cpu_min']:.0f}"
        for r in records))
