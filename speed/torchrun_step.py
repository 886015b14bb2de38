"""Speed: the default meta-step over 2 processes (torchrun, gloo) against 1 process with 2 threads.

    python speed/torchrun_step.py                # writes results/speed/torchrun_<cpu>.json
    python speed/torchrun_step.py --repeats 3 --steps 20 --tasks 5 10

For each meta-batch size it times `--steps` default meta-steps (section 10's merged path, Adam included) at the
paper's sizes on synthetic cheetah-sized data, in fresh processes, A and B interleaved in each repeat:
    A  python macaw.py's way: 1 process, --threads 2 (torch spreads each operation over both cores)
    B  torchrun --nproc-per-node 2: 2 processes x 1 thread, each taking half of the meta-batch's tasks, one
       all-reduce of the meta-gradient per step (sum_gradients_over_processes)
The table gives the median and the range of meta-steps/s over the repeats; each record has `processes`.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "speed"))
import macaw  # noqa: E402
from meta_step import cpu_name, cpu_vendor, synthetic_batches  # noqa: E402


def worker(tasks, steps, threads):
    """One timed process (under torchrun: one of them); process 0 prints {"steps_per_s": ...}."""
    torch.set_num_threads(threads)
    rank, world = macaw.process_share()
    cfg = macaw.Config(meta_batch=tasks)
    macaw.join_processes(cfg)
    torch.manual_seed(0)
    model = macaw.MACAW(17, 6, cfg)
    optimizers, meta_step = macaw.meta_step_over_processes(model, 20, cfg)
    batches = synthetic_batches(cfg, tasks)[rank::world]
    for _ in range(3):  # warm-up
        meta_step(batches)
    start = time.perf_counter()
    for _ in range(steps):
        meta_step(batches)
    rate = steps / (time.perf_counter() - start)
    if rank == 0:
        print(json.dumps(dict(steps_per_s=rate)))


def timed(processes, tasks, steps):
    script = [str(Path(__file__).resolve()), "--worker", "--tasks", str(tasks), "--steps", str(steps)]
    if processes == 1:
        command = [sys.executable, *script, "--threads", "2"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   *script, "--threads", "1"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["steps_per_s"]


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[5])
    parser.add_argument("--steps", type=int, default=40, help="timed meta-steps per process start")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="(the worker's own threads)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "results" / "speed" / f"torchrun_{cpu_vendor()}.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(args.tasks[0], args.steps, args.threads)
    device = f"{cpu_name()}, {torch.get_num_threads()} cores visible to torch"
    print(f"torch {torch.__version__}, {device}; {args.repeats} repeats of {args.steps} meta-steps, interleaved")
    print(f"{'tasks':>5} {'processes x threads':>20} {'steps/s median':>15} {'(min-max)':>13} {'vs 1 x 2':>9}")
    records = []
    settings = ((1, 2), (2, 1))  # (processes, threads each)
    for tasks in args.tasks:
        rates = {s: [] for s in settings}
        for _ in range(args.repeats):
            for s in settings:
                rates[s].append(timed(s[0], tasks, args.steps))
        base = statistics.median(rates[settings[0]])
        for (processes, threads), r in rates.items():
            median = statistics.median(r)
            print(f"{tasks:>5} {f'{processes} x {threads}':>20} {median:15.2f} {f'({min(r):.1f}-{max(r):.1f})':>13} "
                  f"{median / base:8.2f}x", flush=True)
            records.append(dict(kind="meta_step", tasks=tasks, processes=processes, threads=threads, path="merged",
                                steps_per_s=round(median, 3), min=round(min(r), 3), max=round(max(r), 3),
                                speedup_vs_one_process=round(median / base, 3), repeats=args.repeats,
                                steps=args.steps, device=device, commit=macaw.git_commit(),
                                date=time.strftime("%Y-%m-%d"), command="python " + " ".join(sys.argv)))
    macaw.write_json(args.out, records)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
