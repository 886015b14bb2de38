"""Shared set-up for the worked solutions of the tutorial's exercises (tutorial.ipynb, section 8).

Each solution is a script: `python solutions/<name>.py` runs it at the size the notebook quotes;
`--quick` runs a tiny version (what CI does, to keep the solutions working).
"""
import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import macaw  # noqa: E402


def parse_args(description):
    """The scripts' flags; also sets 1 torch thread (steadiest for these small networks, docs/speed.md)."""
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny run that only checks the script works")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent / "tutorial_data"),
                        help="where the point-robot data are made and reused (shared with the notebook)")
    return parser.parse_args()


def point_robot(data_dir, env="point-robot", **overrides):
    """The tutorial's set-up: point-robot, width-32 networks, its offline data loaded as TaskData."""
    bench = macaw.get_benchmark(env)
    cfg = macaw.Config(env=env, data_dir=data_dir, net_width=32, seed=0, **overrides).resolve(bench)
    data = macaw.load_benchmark_data(cfg, bench)
    return cfg, bench, data


def meta_train(cfg, bench, data, steps, seed=0, every=None, rollouts=3):
    """Meta-train in memory (no run files); evaluate at step 0, every `every` steps and at the end.
    Returns the model and a list of dicts: step, pre and post (mean over held-out tasks)."""
    torch.manual_seed(seed)
    model = macaw.MACAW(data[0].tensors["obs"].shape[1], data[0].tensors["actions"].shape[1], cfg)
    optimizers = macaw.make_optimizers(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps + 1):
        if step > 0:
            batches = macaw.sample_meta_batch(data, bench.train_ids, cfg, gen)
            macaw.meta_train_step(model, optimizers, batches, len(bench.train_ids), cfg)
        if step in (0, steps) or (every and step % every == 0):
            res = macaw.evaluate(model, bench, data, cfg, gen, rollouts=rollouts)
            history.append(dict(step=step, pre=float(np.mean([r["pre"] for r in res.values()])),
                                post=float(np.mean([r["post"] for r in res.values()]))))
    return model, history


@contextlib.contextmanager
def replaced(**functions):
    """Swap macaw.<name> for each given function while the block runs (the same as editing the file), and
    put the originals back however the block ends, an error included. The solutions meta-train with
    macaw.meta_train_step, section 6 as written, so the swapped functions are what runs."""
    originals = {name: getattr(macaw, name) for name in functions}
    try:
        for name, f in functions.items():
            setattr(macaw, name, f)
        yield originals
    finally:
        for name, f in originals.items():
            setattr(macaw, name, f)


def mean_and_spread(values):
    return f"{np.mean(values):7.2f} +- {np.std(values):5.2f}"


__all__ = ["F", "macaw", "mean_and_spread", "meta_train", "np", "parse_args", "point_robot", "replaced", "torch"]
