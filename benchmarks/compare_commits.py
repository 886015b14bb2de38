"""Same-sitting A/B of one meta-step path at two commits of macaw.py, interleaved in one process.

    python benchmarks/compare_commits.py ec75eb0 HEAD --path compiled     # --compile before/after its merged form
    python benchmarks/compare_commits.py dbcdc50 577fb6b --path merged plain

Each commit's macaw.py is read with `git show` into a temporary file and imported under its own name; for each
path and task count both are set up like benchmarks/meta_step.py (paper sizes, synthetic cheetah-sized batches,
1 thread) and timed in alternating windows. Prints the median meta-steps/s of each and their ratio (min-max in
brackets). Speeds from another day or machine are not comparable: this is for changes measured side by side.
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import meta_step  # noqa: E402  (PATHS, synthetic_batches; imports the working tree's macaw)


def load_macaw(commit, folder):
    source = subprocess.run(["git", "show", f"{commit}:macaw.py"], cwd=HERE.parent, capture_output=True,
                            text=True, check=True).stdout
    path = Path(folder) / f"macaw_{commit.replace('~', '_').replace('^', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # (dataclasses and pickling look modules up by name)
    spec.loader.exec_module(module)
    return module


def make_step(m, path, tasks):
    cfg = m.Config(**meta_step.PATHS.get(path, {}))
    torch.manual_seed(0)
    model = m.MACAW(meta_step.OBS_DIM, meta_step.ACT_DIM, cfg)
    batches = meta_step.synthetic_batches(cfg, tasks)
    optimizers = m.make_optimizers(model, cfg)
    gradient = m.compiled_meta_gradient(model, tasks, cfg) if path == "compiled" else None
    return lambda: m.meta_train_step(model, optimizers, batches, tasks, cfg, gradient)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--path", nargs="+", default=["merged"], choices=[*meta_step.PATHS, "compiled"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        modules = {c: load_macaw(c, folder) for c in (args.a, args.b)}
        for tasks in args.tasks:
            steps = {(c, p): make_step(m, p, tasks) for c, m in modules.items() for p in args.path}
            for step in steps.values():  # warm-up (and, for "compiled", compiling)
                for _ in range(3):
                    step()
            rates = {k: [] for k in steps}
            for _ in range(args.repeats):
                for k, step in steps.items():
                    n, start = 0, time.perf_counter()
                    while time.perf_counter() - start < args.seconds:
                        step()
                        n += 1
                    rates[k].append(n / (time.perf_counter() - start))
            for p in args.path:
                a, b = (rates[(c, p)] for c in (args.a, args.b))
                print(f"{tasks} tasks, {p:>8}: {args.a} {statistics.median(a):6.2f} ({min(a):.1f}-{max(a):.1f})   "
                      f"{args.b} {statistics.median(b):6.2f} ({min(b):.1f}-{max(b):.1f})   "
                      f"ratio {statistics.median(b) / statistics.median(a):.3f}", flush=True)


if __name__ == "__main__":
    main()
