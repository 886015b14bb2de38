"""Benchmark: MACAW meta-steps per second at the paper's network sizes on synthetic cheetah-sized data.

    python benchmarks/meta_step.py                 # loop vs vmap, 1 vs 2 threads, 2 and 5 tasks
    python benchmarks/meta_step.py --seconds 20    # longer timing windows

Each setting warms up for 3 steps, then times full meta_train_step calls (inner + outer + Adam).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import macaw  # noqa: E402


def time_steps(cfg, tasks, seconds, obs_dim=17, act_dim=6):
    torch.manual_seed(0)
    model = macaw.MACAW(obs_dim, act_dim, cfg)
    opts = macaw.make_optimizers(model, cfg)
    g = torch.Generator().manual_seed(0)

    def batch(n):
        return dict(obs=torch.randn(n, obs_dim, generator=g), actions=torch.rand(n, act_dim, generator=g) * 2 - 1,
                    mc_return=torch.randn(n, generator=g) * 100, terminal_obs=torch.randn(n, obs_dim, generator=g),
                    terminal_discount=torch.rand(n, generator=g))
    batches = [(batch(cfg.inner_batch), batch(cfg.outer_batch)) for _ in range(tasks)]
    for _ in range(3):
        macaw.meta_train_step(model, opts, batches, tasks, cfg)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        macaw.meta_train_step(model, opts, batches, tasks, cfg)
        n += 1
    return n / (time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} default threads")
    print(f"{'tasks':>5} {'threads':>7} {'form':>5} {'meta-steps/s':>13}")
    for tasks in args.tasks:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for vmap_tasks in (False, True):
                cfg = macaw.Config(vmap_tasks=vmap_tasks)
                rate = time_steps(cfg, tasks, args.seconds)
                print(f"{tasks:>5} {threads:>7} {'vmap' if vmap_tasks else 'loop':>5} {rate:13.2f}", flush=True)
