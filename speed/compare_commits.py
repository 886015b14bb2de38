"""Same-sitting A/B of one meta-step path at two commits of macaw.py, interleaved in one process.

    python speed/compare_commits.py HEAD~1 HEAD --path merged plain
    python speed/compare_commits.py A B --out results/speed/refactor_ab.json   # keep the figures (docs/speed.md)

Each commit's macaw.py is read with `git show` into a temporary file and imported under its own name; for each
path and task count both are set up by speed/meta_step.py's setup() (paper sizes, synthetic cheetah-sized batches,
1 thread) and timed in alternating windows. Prints the median meta-steps/s of each and their ratio (min-max in
brackets). Speeds from another day or machine are not comparable: this is for changes measured side by side.
"""
import argparse
import datetime
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import meta_step  # noqa: E402  (its setup() builds each path's model, optimisers and batches)


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


def main():
    parser = argparse.ArgumentParser(description=(__doc__ or " ").splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--path", nargs="+", default=["merged"], choices=[*meta_step.PATHS, "compiled"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    records = []
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        modules = {c: load_macaw(c, folder) for c in (args.a, args.b)}
        for tasks in args.tasks:
            states = {(c, p): meta_step.setup(p, tasks, "cpu", m) for c, m in modules.items() for p in args.path}
            for state in states.values():  # warm-up (and, for "compiled", compiling)
                meta_step.steps_per_second(state, 0.5, "cpu")
            rates = {k: [] for k in states}
            for _ in range(args.repeats):
                for k, state in states.items():  # interleaved
                    rates[k].append(meta_step.steps_per_second(state, args.seconds, "cpu"))
            for p in args.path:
                a, b = (rates[(c, p)] for c in (args.a, args.b))
                records.append(dict(kind="ab", tasks=tasks, threads=1, path=p, before_commit=args.a, after_commit=args.b,
                                    before=statistics.median(a), before_min=min(a), before_max=max(a),
                                    after=statistics.median(b), after_min=min(b), after_max=max(b),
                                    ratio=statistics.median(b) / statistics.median(a), repeats=args.repeats,
                                    seconds=args.seconds, device=f"{meta_step.cpu_name()}, 1 thread",
                                    date=datetime.date.today().isoformat()))
                print(f"{tasks} tasks, {p:>8}: {args.a} {statistics.median(a):6.2f} ({min(a):.1f}-{max(a):.1f})   "
                      f"{args.b} {statistics.median(b):6.2f} ({min(b):.1f}-{max(b):.1f})   "
                      f"ratio {statistics.median(b) / statistics.median(a):.3f}", flush=True)
    if args.out:
        meta_step.macaw.write_json(args.out, records)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
