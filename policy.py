"""SPOWL's safe policy (Sec. 4.2; Eq. 7-10): a max-entropy policy on latents, trained with an Augmented Lagrangian.

The policy maximises the (scaled) value of the world model's Q ensemble plus an entropy bonus, while an Augmented
Lagrangian term Psi keeps the predicted cost value of its actions below a strict limit b.  The Lagrangian's state --
the multiplier lambda and the non-decreasing penalty mu -- is defined and updated here (Eq. 10), after every step.
"""

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from world_model import aggregate, head_values, mlp


def init_policy(key, args, action_dim):
    """pi: latent -> (mean, log-std pre-activation), two hidden layers (Fig. 1; the authors' `WorldModel._pi`)."""
    return mlp(key, [args.latent_dim, args.mlp_dim, args.mlp_dim, 2 * action_dim])


def sample_action(policy, z, key, args):
    """A tanh-squashed Gaussian action a ~ pi(z) and its log-probability: (..., L) -> (..., A), (...).

    Following the authors' (TD-MPC2-style) code, the Gaussian log-probability is multiplied by the action
    dimension A before the tanh correction (their `gaussian_logprob` in `spowl/spowl/math.py`); the entropy
    coefficient is tuned for that scale.
    """
    mean, log_std = jnp.split(policy(z), 2, -1)
    log_std = args.log_std_min + 0.5 * (args.log_std_max - args.log_std_min) * (jnp.tanh(log_std) + 1)
    eps = jax.random.normal(key, mean.shape)
    action = jnp.tanh(mean + jnp.exp(log_std) * eps)
    action_dim = mean.shape[-1]
    log_prob = action_dim * ((-0.5 * eps**2 - log_std).sum(-1) - 0.5 * math.log(2 * math.pi))
    log_prob = log_prob - jnp.log(jax.nn.relu(1 - action**2) + 1e-6).sum(-1)
    return action, log_prob


def deterministic_action(policy, z):
    """The eval-mode policy action tanh(mean)."""
    return jnp.tanh(jnp.split(policy(z), 2, -1)[0])


class Lagrangian(NamedTuple):
    """The state of Eq. 10's Augmented Lagrangian, updated after every gradient step."""

    multiplier: jax.Array  # lambda
    penalty: jax.Array  # mu


def init_lagrangian(args):
    return Lagrangian(jnp.asarray(args.lagrange_init, jnp.float32), jnp.asarray(args.penalty_init, jnp.float32))


def augmented_lagrangian(delta, lagrangian):
    """Psi of Eq. 10: lambda Delta + mu/2 Delta^2 while lambda + mu Delta > 0, else -lambda^2 / (2 mu)."""
    multiplier, penalty = lagrangian.multiplier, lagrangian.penalty
    active = multiplier + penalty * delta > 0
    return jnp.where(active, multiplier * delta + 0.5 * penalty * delta**2, -(multiplier**2) / (2 * penalty))


def update_lagrangian(lagrangian, delta, args, episode_cost=None):
    """Eq. 10's step as the authors implement it (`make_step` in `spowl/spowl/update.py`): lambda <- clip(lambda +
    mu Delta, 0, lagrange-max) with the *old* mu, then mu <- min(mu (1 + nu), penalty-max) (the paper misprints a
    max; docs/differences.md).  With --episode-cost-limit (not the paper's) lambda steps by multiplier-lr x
    (episode_cost - limit) instead."""
    multiplier, penalty = lagrangian.multiplier, lagrangian.penalty
    if args.episode_cost_limit is None:
        step = penalty * delta
    else:
        step = args.multiplier_lr * (episode_cost - args.episode_cost_limit)
    return lagrangian._replace(multiplier=jnp.clip(multiplier + step, 0.0, args.lagrange_max),
                               penalty=jnp.minimum(penalty * (1 + args.penalty_growth), args.penalty_max))


def cost_per_episode(cost, active, episode_steps):
    """Each seed's cost per full episode in a round's training envs, (N,), from its costs (K, N, E) over the steps
    played (`active`, (K,)): the cost that drives lambda under --episode-cost-limit."""
    active = active[:, None, None]
    return (cost * active).sum((0, 2)) / jnp.maximum(active.sum() * cost.shape[2], 1) * episode_steps


def policy_loss(policy, model, latents, lagrangian, scale, key, args, safe=True):
    """Safe policy objective of Eq. 7-9 with the authors' scaling (`make_step` in `spowl/spowl/update.py`).

    latents: the rolled-out z_0..z_H of the world-model loss, (H+1, B, L), constants here.  The Q and cost-value
    heads of the (already updated) world model run in training mode (dropout on), as in the authors' code.
    Reward part: (1/(H+1)) sum_t rho^t mean_b (alpha log pi - Q_avg / S) with Q_avg the mean of 2 random heads and
    S a running scale of the Q spread.  Safety part (skipped when `safe` is False, the unsafe TD-MPC2 baseline):
    Psi(Delta) with Delta = mean over all states of (Q^c_agg(z, a) - b), gradients flowing through a into pi.
    Returns the loss and a dict of diagnostics including Delta and the new scale S.
    """
    keys = jax.random.split(key, 5)
    action, log_prob = sample_action(policy, latents, keys[0], args)
    q = aggregate(head_values(model.q, latents, action, args, keys[1]), keys[2], args.q_subsample, "avg")
    spread = jnp.percentile(q[0], 95) - jnp.percentile(q[0], 5)
    new_scale = scale + args.scale_tau * (jnp.maximum(spread, 1.0) - scale)
    if args.stop_scale_grad:
        new_scale = jax.lax.stop_gradient(new_scale)
    rho = args.rho ** jnp.arange(latents.shape[0])
    reward_loss = (rho * (args.entropy_coef * log_prob - q / new_scale).mean(-1)).mean()
    cost_value = aggregate(head_values(model.cost_value, latents, action, args, keys[3]), keys[4],
                           args.cost_subsample, args.delta_agg)
    delta = (cost_value - args.cost_limit).mean()
    psi = augmented_lagrangian(delta, lagrangian) if safe else jnp.zeros(())
    info = {"reward_loss": reward_loss, "psi": psi, "delta": delta, "scale": new_scale,
            "entropy": -log_prob.mean()}
    return reward_loss + psi, info


def policy_grad_norms(loss, policy, grads):
    """How hard each part of the policy loss pulls (a diagnostic, --diagnostics): the gradient norms of the reward
    part, of Psi (the rest of the applied `grads`) and of Delta; `loss` is policy_loss with all but the policy bound."""
    part_grad = lambda part: eqx.filter_grad(lambda p: loss(p)[1][part])(policy)  # noqa: E731
    reward_grads, delta_grads = part_grad("reward_loss"), part_grad("delta")
    return {"reward_grad_norm": optax.tree.norm(reward_grads), "delta_grad_norm": optax.tree.norm(delta_grads),
            "psi_grad_norm": optax.tree.norm(jax.tree.map(jnp.subtract, grads, reward_grads))}
