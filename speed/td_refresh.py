"""Speed: what --value-target td-lambda costs, on a benchmark's real data, one sitting.

    python speed/td_refresh.py --env cheetah-vel     # needs the benchmark's data (made by its first run)

Times, interleaved, `--repeats` times each: one refresh_lambda_returns over every training task (an inner value
step per task, V at every stored next state, the lambda-return sweep) and one default meta-step, both at the
paper's sizes on 1 thread; then the refresh's cost per meta-step at the default --td-refresh. Writes
results/speed/td_refresh_<env>.json.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "speed"))
import macaw  # noqa: E402
from meta_step import cpu_name  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--env", default="cheetah-vel")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = macaw.get_benchmark(args.env)
    cfg = macaw.Config(env=args.env, data_dir=args.data_dir, value_target="td-lambda").resolve(bench)
    if macaw.missing_tasks(cfg, bench):
        raise SystemExit(f"no {args.env} data in {args.data_dir}/: run python macaw.py --env {args.env} first")
    task_data = macaw.load_benchmark_data(cfg, bench)
    torch.manual_seed(0)
    model = macaw.MACAW(task_data[0].tensors["obs"].shape[1], task_data[0].tensors["actions"].shape[1], cfg)
    optimizers, meta_step = macaw.meta_step_function(model, len(bench.train_ids), cfg)
    gen = torch.Generator().manual_seed(0)
    refresh = lambda: macaw.refresh_lambda_returns(model, task_data, bench.train_ids, cfg, gen)
    step = lambda: meta_step(macaw.sample_meta_batch(task_data, bench.train_ids, cfg, gen))
    refresh(), step()  # warm-up
    times = {"refresh": [], "meta_step": []}
    for _ in range(args.repeats):
        for name, call in (("refresh", refresh), ("meta_step", lambda: [step() for _ in range(10)])):
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) / (10 if name == "meta_step" else 1))
    refresh_s, step_s = statistics.median(times["refresh"]), statistics.median(times["meta_step"])
    rows = sum(len(task_data[k].episodes["rewards"]) for k in bench.train_ids)
    per_step = refresh_s / cfg.td_refresh
    print(f"{args.env}: a refresh over {len(bench.train_ids)} tasks, {rows:,} stored steps: {refresh_s:.2f} s "
          f"(median of {args.repeats}); a meta-step: {step_s * 1000:.0f} ms; every {cfg.td_refresh} steps the refresh "
          f"adds {per_step * 1000:.0f} ms per meta-step ({per_step / step_s:.0%})")
    macaw.write_json(ROOT / "results" / "speed" / f"td_refresh_{args.env}.json", dict(
        kind="td_refresh", env=args.env, tasks=len(bench.train_ids), stored_steps=rows, refresh_s=round(refresh_s, 3),
        meta_step_s=round(step_s, 4), td_refresh=cfg.td_refresh, added_per_meta_step=round(per_step / step_s, 3),
        refresh_each=[round(t, 3) for t in times["refresh"]], meta_step_each=[round(t, 4) for t in times["meta_step"]],
        device=f"{cpu_name()}, 1 thread", commit=macaw.git_commit(), date=time.strftime("%Y-%m-%d"),
        command="python " + " ".join(sys.argv)))


if __name__ == "__main__":
    main()
