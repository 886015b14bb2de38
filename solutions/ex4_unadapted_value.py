"""Exercise 4 (tutorial.ipynb, section 8): advantages from the unadapted value function.

The edit to macaw.py: in `adapt`, compute the inner advantages (2) with V_phi instead of V_phi'
(`macaw.advantages(model.value, vparams, inner)`), everything else unchanged; here a copy of
`adapt` installed by assignment. Meta-train both versions on 3 seeds and compare.
"""
from common import macaw, mean_and_spread, meta_train, parse_args, point_robot, replaced
from torch.func import grad


def adapt_with_unadapted_advantages(model, vparams, pparams, inner, cfg):
    """macaw.adapt with the edit of this exercise (marked)."""
    def value_step_loss(p):
        loss = macaw.value_loss(model.value, p, inner, inner["mc_return"])
        return loss, loss.detach()
    v_grads, inner_v = grad(value_step_loss, has_aux=True)(vparams)
    adapted_v = macaw.sgd_step(vparams, v_grads, model.raw_value_lrs)
    target_v = {k: p.detach() for k, p in macaw.sgd_step(vparams, v_grads, model.raw_value_lrs,
                                                         1 - cfg.target_vf_alpha).items()}
    adv = macaw.advantages(model.value, vparams, inner)  # the edit: phi, not phi'

    def policy_step_loss(p):
        loss, head = macaw.inner_policy_loss(model.policy, p, model.raw_adv_coef, inner, adv, cfg)
        return loss, (loss.detach(), head.detach())
    p_grads, (inner_pi, head) = grad(policy_step_loss, has_aux=True)(pparams)
    adapted_p = macaw.sgd_step(pparams, p_grads, model.raw_policy_lrs)
    return adapted_v, adapted_p, target_v, dict(inner_value=inner_v, inner_policy=inner_pi, inner_head=head)


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    steps, seeds = (5, [0]) if args.quick else (300, [0, 1, 2])
    cfg, bench, data = point_robot(args.data_dir)
    print(f"point-robot, {steps} meta-steps: held-out return (mean +- std over {len(seeds)} seed(s))")
    for name, version in (("advantages from V_phi' (MACAW)", macaw.adapt),
                          ("advantages from V_phi (edit)", adapt_with_unadapted_advantages)):
        with replaced(adapt=version):
            runs = [meta_train(cfg, bench, data, steps, seed)[1] for seed in seeds]
        print(f"  {name:>32}: at step 0 {mean_and_spread([h[0]['post'] for h in runs])}, "
              f"after training {mean_and_spread([h[-1]['post'] for h in runs])}")
