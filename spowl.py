"""SPOWL -- Safe Planning and Policy Optimization via World Model Learning -- in JAX: config, env, training loop.

    python spowl.py --env-id SafetyPointGoal1-v0

A TD-MPC2-style implicit world model with cost heads (world_model.py), a safe policy trained with an Augmented
Lagrangian (policy.py), a safe improvement planner with a plan/policy switch (planner.py) and a replay buffer
(buffer.py).  `make_train(args)` returns a pure `train` whose per-step work -- act, env step, buffer add, gradient
updates -- is one `lax.scan` inside one `jit`, run in chunks between log / eval / checkpoint points.
Safety-Gymnasium envs run in worker processes stepped from inside the scan by a host callback; the pure-JAX test-bed
(jax_env.py) is stepped inside the scan itself and can train several seeds at once with `vmap`.
"""

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro

import buffer as replay
from planner import act
from policy import init_policy, policy_loss, sample_action, update_multipliers
from world_model import encode, init_world_model, targets, td_targets, world_model_loss


@dataclass(frozen=True)
class Args:
    # Experiment
    env_id: str = "SafetyPointGoal1-v0"
    """a Safety-Gymnasium task with vector observations, or JaxPointGoal1-v0 (the pure-JAX test-bed)"""
    seed: int = 1
    """seed of the run (networks, planner, envs)"""
    num_seeds: int = 1
    """seeds trained at once with vmap (seed, seed+1, ...); JAX envs only"""
    total_timesteps: int = 5_000_000
    """raw training env steps, summed over envs (an agent step repeats its action `action-repeat` times)"""
    num_envs: int = 10
    """parallel training envs"""
    learning_starts: int = 5_000
    """raw env steps of uniform random actions before planning and gradient updates start"""
    log_every: int = 5_000
    """raw env steps between log rows"""
    eval_every: int = 50_000
    """raw env steps between evaluations"""
    eval_episodes: int = 10
    """full episodes per evaluation, on envs of their own"""
    checkpoint_every: int = 100_000
    """raw env steps between checkpoints (one latest checkpoint in the run directory)"""
    log_dir: Optional[str] = None
    """run directory (metrics.jsonl, TensorBoard events, config, checkpoint); default runs/{env_id}__{seed}__{time}"""
    resume: Optional[str] = None
    """a run directory to continue with its saved config (a higher --total-timesteps extends it)"""
    track: bool = False
    """log to Weights & Biases as well"""
    wandb_project: str = "spowl"
    """W&B project name"""
    capture_video: bool = False
    """save a video of one eval episode at each evaluation (headless: MUJOCO_GL=egl or osmesa)"""
    progress_bar: bool = True
    """show a progress bar with steps/s and the last eval return and cost"""

    # Agent modes (Sec. 5.1-5.2)
    planner: Literal["spowl", "tdmpc2", "cce"] = "spowl"
    """elite selection: safe improvement (Alg. 1), unsafe TD-MPC2 baseline (no cost anywhere), constrained CE"""
    act: Literal["switch", "plan", "policy"] = "switch"
    """acting: plan/policy switch (Alg. 2), plan only, policy only"""

    # Environment and schedule (SPEC 1-2)
    action_repeat: int = 5
    """raw env steps per agent step (reward and cost summed); Safety-Gymnasium only"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions, in total over envs"""
    utd_ratio: int = 1
    """gradient updates per agent transition collected (num-envs x this per vector step)"""
    batch_size: int = 256
    """windows of horizon+1 steps per gradient update"""

    # World model (SPEC 4-6)
    latent_dim: int = 512
    """latent size L (a multiple of simnorm-dim)"""
    mlp_dim: int = 512
    """hidden width of dynamics, heads and policy"""
    enc_dim: int = 256
    """hidden width of the encoder"""
    num_enc_layers: int = 2
    """encoder layers (hidden layers + 1)"""
    simnorm_dim: int = 8
    """SimNorm group size"""
    num_q: int = 5
    """Q ensemble size"""
    num_cost_heads: int = 5
    """cost-head and cost-value ensemble sizes"""
    dropout: float = 0.01
    """dropout on the first layer of the Q and cost-value heads"""
    cost_dropout: float = 0.0
    """dropout on the first layer of the cost heads"""
    num_bins: int = 101
    """bins of the discrete regression"""
    vmin: float = -10.0
    """lowest bin, in symlog space"""
    vmax: float = 10.0
    """highest bin, in symlog space"""
    gamma: float = 0.975
    """reward discount"""
    cost_gamma: float = 0.997
    """cost discount"""
    rho: float = 0.5
    """temporal weight rho^t of the losses over the horizon (lambda of Eq. 5, 7)"""
    consistency_coef: float = 20.0
    """latent consistency loss coefficient"""
    reward_coef: float = 0.1
    """reward loss coefficient"""
    value_coef: float = 0.1
    """value loss coefficient"""
    cost_coef: float = 0.1
    """cost loss coefficient"""
    cost_value_coef: float = 0.1
    """cost-value loss coefficient"""
    cost_imb_weight: float = 10.0
    """cost-loss weight of samples with cost > 0 (cost signals are rare)"""
    q_subsample: int = 2
    """Q heads drawn for min (TD target) or average (policy, planner, switch)"""
    cost_subsample: int = 5
    """cost-value heads drawn for aggregation (5x5 default, Fig. 8)"""
    cost_target_agg: Literal["min", "max", "avg"] = "avg"
    """cost-value aggregation in the TD target (Eq. 6, Fig. 7)"""
    tau: float = 0.01
    """EMA rate of the target ensembles"""
    lr: float = 3e-4
    """learning rate (world model and policy)"""
    enc_lr_scale: float = 0.3
    """encoder learning-rate factor"""
    grad_clip_norm: float = 20.0
    """global gradient-norm clip"""
    policy_adam_eps: float = 1e-5
    """Adam epsilon of the policy optimiser"""

    # Safe policy (Eq. 7-10, SPEC 7)
    log_std_min: float = -10.0
    """lower bound of the policy log-std"""
    log_std_max: float = 2.0
    """upper bound of the policy log-std"""
    entropy_coef: float = 1e-4
    """entropy coefficient alpha_H"""
    scale_tau: float = 0.01
    """rate of the running Q scale S"""
    stop_scale_grad: bool = False
    """stop the gradient through S (the authors' code does not)"""
    cost_limit: float = 0.1
    """b: the cost-value limit"""
    delta_agg: Literal["avg", "max"] = "avg"
    """cost-value aggregation in the violation Delta (Fig. 8)"""
    lagrange_init: float = 1e-6
    """initial multiplier lambda"""
    penalty_init: float = 5e-9
    """initial penalty mu"""
    penalty_growth: float = 5e-6
    """penalty growth rate nu: mu <- min(mu (1 + nu), penalty-max)"""
    penalty_max: float = 1.0
    """upper bound of mu"""
    lagrange_max: float = 10.0
    """upper bound of lambda (inf: the paper's unbounded multiplier)"""

    # Planner (Eq. 11-12, Alg. 1-2, SPEC 9-11)
    horizon: int = 3
    """planning and training horizon H"""
    iterations: int = 6
    """MPPI iterations"""
    num_samples: int = 512
    """action sequences per iteration, policy prior included"""
    num_pi_trajs: int = 24
    """policy-prior sequences"""
    num_elites: int = 64
    """elites k"""
    temperature: float = 0.5
    """MPPI temperature (multiplies the score)"""
    min_std: float = 0.05
    """lower bound of the sampling std"""
    max_std: float = 2.0
    """initial and upper sampling std"""
    restrict_elites: bool = True
    """cap the improvement set to the top-k by J (Alg. 1)"""
    ci_thresholds: bool = False
    """use the policy action's bootstrap bounds as d_R, d_c instead of the prior means"""
    plan_cost_agg: Literal["mean", "max"] = "mean"
    """immediate-cost aggregation over the cost ensemble in J_c (authors: mean; paper Eq. 11: max)"""
    switch_rule: Literal["ci", "mean"] = "ci"
    """switch bounds: policy action's bootstrap interval (authors) or its averages (paper, Alg. 2)"""
    ci_resamples: int = 1_000
    """bootstrap resamples of the switch's interval"""
    cce_threshold: float = 0.1
    """d_plan of the CCE planner"""
    cce_estimate: Literal["local", "global"] = "local"
    """CCE's J_c: immediate costs only (local) or with the cost-value bootstrap (global)"""


# ---------------------------------------------------------------------------------------------------------------------
# Agent: parameters, optimiser states and Lagrangian state, updated together (SPEC 8)


class Agent(NamedTuple):
    model: eqx.Module  # world model: encoder, dynamics, reward, cost, Q and cost-value heads
    target: tuple  # EMA copies of the Q and cost-value ensembles
    policy: eqx.Module
    model_opt: optax.OptState
    policy_opt: optax.OptState
    multiplier: jax.Array  # lambda of Eq. 10
    penalty: jax.Array  # mu of Eq. 10
    scale: jax.Array  # running Q scale S of the policy loss


def optimisers(args, model):
    """Adam for the world model (encoder at enc-lr-scale x lr) and for the policy, both after a global-norm clip."""
    encoder_only = eqx.tree_at(lambda m: m.encoder, jax.tree.map(lambda _: False, model),
                               replace_fn=lambda encoder: jax.tree.map(lambda _: True, encoder))
    model_opt = optax.chain(optax.clip_by_global_norm(args.grad_clip_norm), optax.adam(args.lr),
                            optax.masked(optax.scale(args.enc_lr_scale), encoder_only))
    policy_opt = optax.chain(optax.clip_by_global_norm(args.grad_clip_norm), optax.adam(args.lr, eps=args.policy_adam_eps))
    return model_opt, policy_opt


def init_agent(key, args, obs_dim, action_dim):
    key_model, key_policy = jax.random.split(key)
    model = init_world_model(key_model, args, obs_dim, action_dim)
    policy = init_policy(key_policy, args, action_dim)
    model_opt, policy_opt = optimisers(args, model)
    return Agent(model, targets(model), policy, model_opt.init(model), policy_opt.init(policy),
                 jnp.asarray(args.lagrange_init, jnp.float32), jnp.asarray(args.penalty_init, jnp.float32),
                 jnp.ones((), jnp.float32))


def update(agent, batch, key, args):
    """One SPOWL gradient update: world model (Eq. 5-6), then safe policy (Eq. 7-10), then target EMA.

    Returns the new agent and a dict of the named loss terms and diagnostics.
    """
    key_next, key_target, key_model, key_policy = jax.random.split(key, 4)
    model_opt, policy_opt = optimisers(args, agent.model)
    # TD targets from the encoded next observations and policy actions there (no gradient).
    z_next = encode(agent.model, batch.obs[1:])
    action_next, _ = sample_action(agent.policy, z_next, key_next, args)
    q_target, cost_value_target = td_targets(agent.target, z_next, action_next, batch.reward, batch.cost,
                                             batch.terminated, key_target, args)
    (model_loss, (terms, latents)), grads = eqx.filter_value_and_grad(world_model_loss, has_aux=True)(
        agent.model, batch, z_next, q_target, cost_value_target, key_model, args)
    updates, model_state = model_opt.update(grads, agent.model_opt, agent.model)
    model = eqx.apply_updates(agent.model, updates)
    # The policy sees the rolled-out latents and the *updated* value heads.
    safe = args.planner != "tdmpc2"
    (pi_loss, pi_info), grads = eqx.filter_value_and_grad(policy_loss, has_aux=True)(
        agent.policy, model, latents, agent.multiplier, agent.penalty, agent.scale, key_policy, args, safe)
    updates, policy_state = policy_opt.update(grads, agent.policy_opt, agent.policy)
    policy = eqx.apply_updates(agent.policy, updates)
    multiplier, penalty = agent.multiplier, agent.penalty
    if safe:
        multiplier, penalty = update_multipliers(multiplier, penalty, pi_info["delta"], args)
    target = jax.tree.map(lambda t, o: t + args.tau * (o - t), agent.target, targets(model))
    info = {"model_loss": model_loss, "policy_loss": pi_loss, **terms, **pi_info, "q_target": q_target.mean(),
            "cost_value_target": cost_value_target.mean()}
    return Agent(model, target, policy, model_state, policy_state, multiplier, penalty, pi_info["scale"]), info
