"""SPOWL's safe policy (Sec. 4.2; Eq. 7-10): a max-entropy policy on latents, trained with an Augmented Lagrangian.

The policy maximises the (scaled) value of the world model's Q ensemble plus an entropy bonus, while an Augmented
Lagrangian term Psi keeps the predicted cost value of its actions below a strict limit b.  The multiplier lambda
and the non-decreasing penalty mu are state updated after every step (Eq. 10).
"""

import math

import jax
import jax.numpy as jnp

from world_model import aggregate, head_values, mlp


def init_policy(key, cfg, action_dim):
    """pi: latent -> (mean, log-std pre-activation), two hidden layers (Fig. 1; the authors' `WorldModel._pi`)."""
    return mlp(key, [cfg.latent_dim, cfg.mlp_dim, cfg.mlp_dim, 2 * action_dim])


def sample_action(policy, z, key, cfg):
    """A tanh-squashed Gaussian action a ~ pi(z) and its log-probability: (..., L) -> (..., A), (...).

    Following the authors' (TD-MPC2-style) code, the Gaussian log-probability is multiplied by the action
    dimension A before the tanh correction (their `gaussian_logprob` in `spowl/spowl/math.py`); the entropy
    coefficient is tuned for that scale.
    """
    mean, log_std = jnp.split(policy(z), 2, -1)
    log_std = cfg.log_std_min + 0.5 * (cfg.log_std_max - cfg.log_std_min) * (jnp.tanh(log_std) + 1)
    eps = jax.random.normal(key, mean.shape)
    action = jnp.tanh(mean + jnp.exp(log_std) * eps)
    action_dim = mean.shape[-1]
    log_prob = action_dim * ((-0.5 * eps**2 - log_std).sum(-1) - 0.5 * math.log(2 * math.pi))
    log_prob = log_prob - jnp.log(jax.nn.relu(1 - action**2) + 1e-6).sum(-1)
    return action, log_prob


def deterministic_action(policy, z):
    """The eval-mode policy action tanh(mean)."""
    return jnp.tanh(jnp.split(policy(z), 2, -1)[0])



def augmented_lagrangian(delta, multiplier, penalty):
    """Psi of Eq. 10: lambda Delta + mu/2 Delta^2 while lambda + mu Delta > 0, else -lambda^2 / (2 mu)."""
    active = multiplier + penalty * delta > 0
    return jnp.where(active, multiplier * delta + 0.5 * penalty * delta**2, -(multiplier**2) / (2 * penalty))


def update_multipliers(multiplier, penalty, delta, cfg, episode_cost=None):
    """Multiplier and penalty update of Eq. 10 as the authors implement it (`make_step` in `spowl/spowl/update.py`).

    lambda <- clip(lambda + mu Delta, 0, lagrange_max) with the *old* mu;  mu <- min(mu (1 + nu), penalty_max).
    (The paper prints mu = max(mu (nu + 1), 1), a typo that would make mu >= 1 from the first step; an
    unbounded lambda as in the paper is `--lagrange-max inf`.)
    Not the paper's: with `cfg.episode_cost_limit` set, lambda instead follows the measured cost per episode,
    lambda <- clip(lambda + multiplier_lr (episode_cost - limit), 0, lagrange_max), a Lagrangian on real costs
    that shrinks again once the policy runs under the limit.
    """
    if cfg.episode_cost_limit is None:
        step = penalty * delta
    else:
        step = cfg.multiplier_lr * (episode_cost - cfg.episode_cost_limit)
    multiplier = jnp.clip(multiplier + step, 0.0, cfg.lagrange_max)
    penalty = jnp.minimum(penalty * (1 + cfg.penalty_growth), cfg.penalty_max)
    return multiplier, penalty


def policy_loss(policy, model, latents, multiplier, penalty, scale, key, cfg, safe=True):
    """Safe policy objective of Eq. 7-9 with the authors' scaling (`make_step` in `spowl/spowl/update.py`).

    latents: the rolled-out z_0..z_H of the world-model loss, (H+1, B, L), constants here.  The Q and cost-value
    heads of the (already updated) world model run in training mode (dropout on), as in the authors' code.
    Reward part: (1/(H+1)) sum_t rho^t mean_b (alpha log pi - Q_avg / S) with Q_avg the mean of 2 random heads and
    S a running scale of the Q spread.  Safety part (skipped when `safe` is False, the unsafe TD-MPC2 baseline):
    Psi(Delta) with Delta = mean over all states of (Q^c_agg(z, a) - b), gradients flowing through a into pi.
    Returns the loss and a dict of diagnostics including Delta and the new scale S.
    """
    keys = jax.random.split(key, 5)
    action, log_prob = sample_action(policy, latents, keys[0], cfg)
    q = aggregate(head_values(model.q, latents, action, cfg, keys[1]), keys[2], cfg.q_subsample, "avg")
    spread = jnp.percentile(q[0], 95) - jnp.percentile(q[0], 5)
    new_scale = scale + cfg.scale_tau * (jnp.maximum(spread, 1.0) - scale)
    if cfg.stop_scale_grad:
        new_scale = jax.lax.stop_gradient(new_scale)
    rho = cfg.rho ** jnp.arange(latents.shape[0])
    reward_loss = (rho * (cfg.entropy_coef * log_prob - q / new_scale).mean(-1)).mean()
    cost_value = aggregate(head_values(model.cost_value, latents, action, cfg, keys[3]), keys[4],
                           cfg.cost_subsample, cfg.delta_agg)
    delta = (cost_value - cfg.cost_limit).mean()
    psi = augmented_lagrangian(delta, multiplier, penalty) if safe else jnp.zeros(())
    info = {"reward_loss": reward_loss, "psi": psi, "delta": delta, "scale": new_scale,
            "entropy": -log_prob.mean()}
    return reward_loss + psi, info
