"""Exercise 1 (tutorial.ipynb, section 8): two inner steps instead of one.

The edit to macaw.py, shown here as two replacement functions installed by assignment (the same as
editing `adapt` and `task_meta_losses` in the file), following the authors' `--maml_steps 2`:
- the 256-row inner batch is split into K contiguous sub-batches, one per step;
- K value steps first, each with the SAME learned step sizes softplus(l_j); after each one the
  target mix is updated, phibar <- 0.9 phibar + 0.1 phi_k (starting from phibar = phi);
- then K policy steps, each on its sub-batch, with advantages recomputed on that sub-batch from the
  FINAL adapted value function phi_K (no gradient), and the same policy step sizes every step;
- the outer losses use phi_K, theta_K and the last phibar. Test-time adaptation takes K steps too.
It is written in section 6's form (macaw.sgd_step, a stepped copy of every tensor), which is what
macaw.meta_train_step runs, so K = 1 can be checked against macaw.adapt tensor by tensor. Use that
form for any multi-step edit: section 10's fast inner step is exact for ONE step only, and a default
`python macaw.py` / macaw.train run stops with a one-line error naming --plain when section 6 has
been replaced, rather than silently train without the edit.
"""
from common import macaw, mean_and_spread, meta_train, parse_args, point_robot, replaced
from torch.func import grad


def adapt_k(model, vparams, pparams, inner, cfg, k):
    subs = [{key: v.chunk(k)[i] for key, v in inner.items()} for i in range(k)]  # contiguous pieces
    a = cfg.target_vf_alpha
    adapted_v, target_v, stats = vparams, {n: p.detach() for n, p in vparams.items()}, {}
    for sub in subs:
        def value_step_loss(p):
            loss = macaw.value_loss(model.value, p, sub, sub["mc_return"])
            return loss, loss.detach()
        v_grads, inner_v = grad(value_step_loss, has_aux=True)(adapted_v)
        adapted_v = macaw.sgd_step(adapted_v, v_grads, model.raw_value_lrs)
        target_v = {n: (a * target_v[n] + (1 - a) * adapted_v[n]).detach() for n in target_v}
        stats.setdefault("inner_value", inner_v)  # log the first step's losses, as with K = 1
    adapted_p = pparams
    for sub in subs:
        adv = macaw.advantages(model.value, adapted_v, sub)

        def policy_step_loss(p):
            loss, head = macaw.inner_policy_loss(model.policy, p, model.raw_adv_coef, sub, adv, cfg)
            return loss, (loss.detach(), head.detach())
        p_grads, (inner_pi, head) = grad(policy_step_loss, has_aux=True)(adapted_p)
        adapted_p = macaw.sgd_step(adapted_p, p_grads, model.raw_policy_lrs)
        stats.setdefault("inner_policy", inner_pi)
        stats.setdefault("inner_head", head)
    return adapted_v, adapted_p, target_v, stats


def k_step_functions(k):
    """Replacements for macaw.adapt (used by evaluate) and macaw.task_meta_losses (used by meta_losses)."""
    def adapt(model, vparams, pparams, inner, cfg):
        return adapt_k(model, vparams, pparams, inner, cfg, k)

    def task_meta_losses(model, vparams, pparams, inner, outer, cfg):
        adapted_v, adapted_p, target_v, stats = adapt_k(model, vparams, pparams, inner, cfg, k)
        target = macaw.bootstrapped_return(model.value, target_v, outer).detach()
        outer_v = macaw.value_loss(model.value, adapted_v, outer, target)
        adv = macaw.advantages(model.value, adapted_v, outer)
        outer_pi = macaw.awr_policy_loss(model.policy, adapted_p, outer, adv, cfg)
        return dict(outer_value=outer_v, outer_policy=outer_pi, **stats)

    return dict(adapt=adapt, task_meta_losses=task_meta_losses)


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    steps, seeds = (5, [0]) if args.quick else (300, [0, 1, 2])
    cfg, bench, data = point_robot(args.data_dir)
    print(f"point-robot, {steps} meta-steps, held-out goals, return after adaptation (mean +- std over seeds)")
    for k in (1, 2):
        with replaced(**k_step_functions(k)) as original:
            if k == 1:  # K = 1 must be exactly the plain algorithm: check on a batch
                inner = data[0].contiguous_batch(cfg.inner_batch, macaw.torch.Generator().manual_seed(0))
                model = macaw.MACAW(2, 2, cfg)
                mine = macaw.adapt(model, *model.params(), inner, cfg)[1]
                plain = original["adapt"](model, *model.params(), inner, cfg)[1]
                assert all(macaw.torch.allclose(mine[n], plain[n], rtol=1e-4, atol=1e-6) for n in plain), \
                    "K = 1 differs from macaw.adapt"
            posts = [meta_train(cfg, bench, data, steps, seed)[1][-1]["post"] for seed in seeds]
        print(f"  K = {k} inner step(s): {mean_and_spread(posts)}   per seed {[round(p, 2) for p in posts]}")
