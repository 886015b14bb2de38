"""Exercise 5 (tutorial.ipynb, section 8): a new benchmark, point-robot with goals on the FULL circle.

No edit to macaw.py: PointRobot.set_task already takes any angle, so a new task family is one
Benchmark entry (here added to macaw.BENCHMARKS at run time; in the file it is one line in the
BENCHMARKS dict). The data, the algorithm and the CLI path (macaw.train) are unchanged.
"""
import tempfile

from common import macaw, np, parse_args

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    angles = np.random.default_rng(0).uniform(0, 2 * np.pi, 25)  # 20 training goals, 5 held out
    macaw.BENCHMARKS["point-robot-circle"] = macaw.Benchmark(
        "point-robot-circle", macaw.PointRobot, tuple(angles.tolist()), tuple(range(20)), tuple(range(20, 25)),
        "scripted", dict(macaw.BENCHMARKS["point-robot"].defaults, steps=300, eval_every=100))
    steps = 5 if args.quick else 300
    with tempfile.TemporaryDirectory() as out:
        for env in ("point-robot", "point-robot-circle"):
            summary = macaw.train(macaw.Config(env=env, data_dir=args.data_dir, out=out, net_width=32, seed=0,
                                               steps=steps, eval_every=steps, final_eval_rollouts=5))
            tasks = summary["tasks"].values()
            print(f"{env}: pre-adaptation {np.mean([t['pre_return'] for t in tasks]):.2f}, adapted "
                  f"{np.mean([t['post_return'] for t in tasks]):.2f}, random "
                  f"{np.mean([t['random_return'] for t in tasks]):.2f}, normalised {summary['mean_normalized']:.2f}")
