"""Exercise 3 (tutorial.ipynb, section 8): first-order MACAW.

The edit to macaw.py: in `adapt`, detach the inner gradients before `sgd_step`, so the meta-gradient
no longer flows through them (no second-order terms). Shown here as a flag on a copy of `adapt`,
swapped in while the meta-gradient is taken. Compare the meta-gradients of one meta-batch with the
full second-order ones. The outer losses never read the advantage head, so everything that reaches
the outer loss only through the inner policy gradient loses its meta-gradient under first order: the
head's loss weight lambda AND the head's own weights (in the full second-order gradient the head
shapes the trunk's inner gradient through h, the last hidden layer it reads, and that is how it is
meta-trained).
"""
from common import macaw, parse_args, point_robot, replaced, torch
from torch.func import grad


def adapt(model, vparams, pparams, inner, cfg, first_order=False):
    """macaw.adapt with the edit of this exercise (marked)."""
    def value_step_loss(p):
        loss = macaw.value_loss(model.value, p, inner, inner["mc_return"])
        return loss, loss.detach()
    v_grads, inner_v = grad(value_step_loss, has_aux=True)(vparams)
    if first_order:  # the edit: no gradient through the inner gradient
        v_grads = {k: g.detach() for k, g in v_grads.items()}
    adapted_v = macaw.sgd_step(vparams, v_grads, model.raw_value_lrs)
    target_v = {k: p.detach() for k, p in macaw.sgd_step(vparams, v_grads, model.raw_value_lrs,
                                                         1 - cfg.target_vf_alpha).items()}
    adv = macaw.advantages(model.value, adapted_v, inner)

    def policy_step_loss(p):
        loss, head = macaw.inner_policy_loss(model.policy, p, model.raw_adv_coef, inner, adv, cfg)
        return loss, (loss.detach(), head.detach())
    p_grads, (inner_pi, head) = grad(policy_step_loss, has_aux=True)(pparams)
    if first_order:
        p_grads = {k: g.detach() for k, g in p_grads.items()}
    adapted_p = macaw.sgd_step(pparams, p_grads, model.raw_policy_lrs)
    return adapted_v, adapted_p, target_v, dict(inner_value=inner_v, inner_policy=inner_pi, inner_head=head)


def meta_gradients(cfg, batches, first_order):
    torch.manual_seed(0)
    model = macaw.MACAW(2, 2, cfg)
    with replaced(adapt=lambda *a: adapt(*a, first_order=first_order)):
        losses = macaw.meta_losses(model, batches, cfg)
    ((losses["outer_value"].sum() + losses["outer_policy"].sum()) / len(batches)).backward()
    policy = dict(model.policy.named_parameters())
    groups = {"value weights phi": list(model.value.parameters()),
              "policy trunk weights": [p for n, p in policy.items() if not n.startswith("head_seq")],
              "advantage head weights": [p for n, p in policy.items() if n.startswith("head_seq")],
              "value step sizes l_V": [model.raw_value_lrs], "policy step sizes l_pi": [model.raw_policy_lrs],
              "head weight lambda": [model.raw_adv_coef]}
    return {name: torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])
            for name, params in groups.items()}  # no .grad at all = no path from the outer loss


if __name__ == "__main__":
    args = parse_args(__doc__.splitlines()[0])
    cfg, bench, data = point_robot(args.data_dir)
    batches = macaw.sample_meta_batch(data, bench.train_ids, cfg, torch.Generator().manual_seed(0))
    full, first = meta_gradients(cfg, batches, False), meta_gradients(cfg, batches, True)
    print(f"{'meta-parameters':>24} {'|full grad|':>12} {'|first-order|':>14} {'cosine':>8}")
    for name in full:
        cos = torch.nn.functional.cosine_similarity(full[name], first[name], dim=0).item()
        print(f"{name:>24} {full[name].norm().item():12.4g} {first[name].norm().item():14.4g} {cos:8.3f}")
    # lambda and the head's weights act on the outer loss only through the inner policy gradient
    assert first["head weight lambda"].abs().item() == 0.0 and first["advantage head weights"].abs().max().item() == 0.0
    assert full["advantage head weights"].abs().max().item() > 0.0  # meta-trained through the second-order path
