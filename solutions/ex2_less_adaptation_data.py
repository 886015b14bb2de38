"""Exercise 2 (tutorial.ipynb, section 8): the ablations with less adaptation data.

Meta-train MACAW, no advantage head and no weight transform (3 seeds each, as in section 7), then
adapt each on 256, 64 and 16 random offline transitions of every held-out goal (cfg.eval_batch).
No edit to macaw.py is needed.
"""
import dataclasses

from common import macaw, mean_and_spread, meta_train, np, parse_args, point_robot, torch

if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    steps, seeds, sizes = (5, [0], [256, 16]) if args.quick else (300, [0, 1, 2], [256, 64, 16])
    cfg, bench, data = point_robot(args.data_dir)
    variants = {"MACAW": {}, "no advantage head": dict(adv_head=False),
                "no weight transform": dict(weight_transform=False)}
    print(f"point-robot, {steps} meta-steps, {len(seeds)} seed(s): held-out return after adaptation "
          f"(5 adaptations per goal and seed; mean +- std over seeds)")
    print(f"{'variant':>20} " + " ".join(f"{f'{n} transitions':>22}" for n in sizes))
    for name, change in variants.items():
        variant_cfg = dataclasses.replace(cfg, **change)
        models = [meta_train(variant_cfg, bench, data, steps, seed)[0] for seed in seeds]
        cells = []
        for n in sizes:
            eval_cfg = dataclasses.replace(variant_cfg, eval_batch=n)
            posts = [np.mean([r["post"] for r in macaw.evaluate(m, bench, data, eval_cfg,
                     torch.Generator().manual_seed(seed), rollouts=5).values()]) for seed, m in zip(seeds, models)]
            cells.append(mean_and_spread(posts))
        print(f"{name:>20} " + " ".join(f"{c:>22}" for c in cells))
