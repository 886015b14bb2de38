"""Where the default meta-step's time goes: a profile by op and shape, and the same ops timed cache-hot and cold.

    python benchmarks/step_profile.py                # 5 tasks, 1 thread, the default (merged) path
    python benchmarks/step_profile.py --path vmap --tasks 2

1. Times `--steps` full training steps of `--path` (the paths of benchmarks/meta_step.py), then the same
   step with networks of width 8 and batches of 8 (the same ops with almost no work in them: the per-op
   overhead), and profiles a few full steps with torch.profiler: the ops that take the most self time,
   grouped by input shapes (milliseconds per step; the profiler itself adds some overhead).
2. Times a few of the step's typical ops alone, cache-hot (the same inputs again and again) and cold
   (a 128 MB buffer is written between calls, which evicts the inputs from the core's caches), and the
   rate at which one core streams memory (an in-place add over 128 MB). An op that takes its cold time
   inside the step is waiting for memory, not computing.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent  # benchmarks/
sys.path.insert(0, str(HERE))
import meta_step  # noqa: E402  (its setup() builds a model, optimisers and synthetic batches for each path)


TINY = dict(net_width=8, latent_dim=8, adv_head_width=8, inner_batch=8, outer_batch=8)


def timed(fn, n, evict=None):
    for _ in range(3):
        fn()
    total = 0.0
    for _ in range(n):
        if evict is not None:
            evict.add_(1.0)
        start = time.perf_counter()
        fn()
        total += time.perf_counter() - start
    return total / n * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default="merged", choices=list(meta_step.PATHS))
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=25, help="how many (op, shapes) rows to print")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg, model, optimizers, batches, step = meta_step.setup(args.path, args.tasks, "cpu")
    for _ in range(5):
        step(batches)
    per_step = timed(lambda: step(batches), args.steps)
    print(f"{args.path}, {args.tasks} tasks, {args.threads} thread(s): {per_step:.1f} ms per meta-step")
    # The same step with tiny networks and batches: the same ops, almost no arithmetic or memory traffic, so
    # its time is the per-op overhead (Python, dispatch, autograd, vmap) that the full step also pays.
    tiny = meta_step.setup(args.path, args.tasks, "cpu", **TINY)
    for _ in range(5):
        tiny[4](tiny[3])
    floor = timed(lambda: tiny[4](tiny[3]), args.steps)
    print(f"the same step at {', '.join(f'{k}={v}' for k, v in TINY.items())}: {floor:.1f} ms (per-op overhead)")
    profiled = 5
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(profiled):
            step(batches)
    rows = sorted(((e.self_cpu_time_total / profiled / 1e3, e.count / profiled, e.key, str(e.input_shapes))
                   for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")), reverse=True)
    print(f"\n{'ms/step':>8} {'calls':>6}  op, input shapes (profiled; self time)")
    for ms, calls, key, shapes in rows[:args.rows]:
        print(f"{ms:8.2f} {calls:6.0f}  {key} {shapes[:100]}")

    # The same kinds of op alone: a layer's T times 5 tasks' latents, a ReLU and a bias add on (tasks, B, width)
    # activations, one merged dJ/dT product; width and latent as in the paper's networks.
    width, latent, rows_t = cfg.net_width, cfg.latent_dim, cfg.net_width * cfg.net_width + cfg.net_width
    T, z = torch.randn(rows_t, latent), torch.randn(args.tasks, latent)
    x, bias = torch.randn(args.tasks, cfg.inner_batch, width), torch.randn(args.tasks, 1, width)
    left, right = torch.randn(rows_t, 2 * args.tasks + 1), torch.randn(2 * args.tasks + 1, latent)
    evict = torch.zeros(32 * 1024 * 1024)  # 128 MB
    start = time.perf_counter()
    evict.add_(1.0)
    stream = 2 * evict.numel() * 4 / (time.perf_counter() - start) / 1e9
    print(f"\none core streams memory at {stream:.1f} GB/s (in-place add over 128 MB: read + write)")
    print(f"{'op':>32} {'hot ms':>8} {'cold ms':>8}")
    for name, fn in [(f"z @ T^T ({args.tasks}x{latent} @ {latent}x{rows_t})", lambda: z @ T.t()),
                     (f"relu ({args.tasks}x{cfg.inner_batch}x{width})", lambda: torch.relu(x)),
                     (f"bias add ({args.tasks}x{cfg.inner_batch}x{width})", lambda: x + bias),
                     (f"merged dJ/dT ({rows_t}x{2 * args.tasks + 1} @ ...)", lambda: left @ right)]:
        print(f"{name:>32} {timed(fn, 200):8.3f} {timed(fn, 50, evict):8.3f}")


if __name__ == "__main__":
    main()
