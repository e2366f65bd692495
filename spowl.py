"""SPOWL -- Safe Planning and Policy Optimization via World Model Learning -- in JAX: config, update, training loop.

    python spowl.py --env-id SafetyPointGoal1-v0

A TD-MPC2-style implicit world model with cost heads (world_model.py), a safe policy trained with an Augmented
Lagrangian (policy.py), a safe improvement planner with a plan/policy switch (planner.py) and a replay buffer
(buffer.py).  `make_train(args)` returns pure functions of a run: an actor that plans and steps the envs for a round
of `sync-every` vector steps in one `lax.scan`, and a learner that stores a round's transitions and makes its gradient
updates in another.  The driver plays each round's actor and the previous round's learner side by side on two
threads, and settles at every log / eval / checkpoint point; an evaluation runs beside the rounds that follow it.
The env layer (envs.py) steps Safety-Gymnasium workers from inside the actor's scan by a host callback, and the
pure-JAX test-bed (jax_env.py) inside the scan itself.
"""

import collections
import dataclasses
import functools
import importlib.metadata
import io
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import buffer as replay
import envs
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
    """seeds seed, seed+1, ... trained at once in one program (vmapped; sharded over the local devices)"""
    total_timesteps: int = 5_000_000
    """raw training env steps, summed over envs (an agent step repeats its action `action-repeat` times)"""
    num_envs: int = 10
    """parallel training envs"""
    learning_starts: int = 5_000
    """raw env steps of uniform random actions before planning and gradient updates start"""
    log_every: int = 5_000
    """raw env steps between log rows"""
    eval_every: int = 50_000
    """raw env steps between evaluations (each runs beside the training after it, unless a checkpoint or the run's
    end falls due at its step)"""
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
    sync_every: int = 20
    """vector steps per round of the training loop: the actor acts with the agent as it was at the round's start
    while the learner makes the previous round's updates, side by side (README, "Speed")"""
    max_env_workers: Optional[int] = None
    """most Safety-Gymnasium worker processes, num-seeds x (num-envs + eval envs), a run may start; default
    max(32, 4 x CPU count)"""
    plan_precision: Literal["float32", "bfloat16"] = "float32"
    """inputs of the networks' matrix products when acting (planning, switch, evaluation), accumulated in float32:
    bfloat16 runs them on GPU tensor cores, where a paper-size planning call is bound by float32 arithmetic (README,
    "Speed"); gradient updates and all parameters stay float32"""

    # Agent modes (Sec. 5.1-5.2)
    planner: Literal["spowl", "tdmpc2", "cce"] = "spowl"
    """elite selection: safe improvement (Alg. 1), unsafe TD-MPC2 baseline (no cost anywhere), constrained CE"""
    act: Optional[Literal["switch", "plan", "policy"]] = None
    """acting: plan/policy switch (Alg. 2), plan only, policy only; left out: switch, or plan under --planner tdmpc2"""

    # Environment and schedule (Sec. 5; the authors' `spowl/configs/config.yaml`)
    action_repeat: int = 5
    """raw env steps per agent step (reward and cost summed); Safety-Gymnasium only"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions, in total over envs"""
    utd_ratio: float = 1.0
    """gradient updates per agent transition collected (num-envs x this, an integer, per vector step)"""
    batch_size: int = 256
    """windows of horizon+1 steps per gradient update"""

    # World model (Sec. 4.1, Fig. 1, Eq. 5-6; the authors' `spowl/configs/agent/spowl.yaml`)
    latent_dim: int = 512
    """latent size L (a multiple of simnorm-dim)"""
    mlp_dim: int = 512
    """hidden width of dynamics, heads and policy"""
    enc_dim: int = 256
    """hidden width of the encoder"""
    num_enc_layers: int = 2
    """encoder layers (hidden layers + 1), at least one hidden layer as in the authors' code (so 1 acts as 2)"""
    simnorm_dim: int = 8
    """SimNorm group size"""
    num_q: int = 5
    """Q ensemble size"""
    num_cost_heads: int = 5
    """cost-head and cost-value ensemble sizes"""
    dropout: float = 0.01
    """dropout on the first layer of the Q and cost-value heads"""
    cost_dropout: float = 0.0
    """dropout on the first layer of the cost heads (in the world-model loss; planning runs without it)"""
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

    # Safe policy (Sec. 4.2, Eq. 7-10)
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

    # Planner (Sec. 4.3-4.4 and 5.1, Eq. 11-12, Alg. 1-2)
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
# Agent: parameters, optimiser states and Lagrangian state, updated together (the authors' `make_step` in
# `spowl/spowl/update.py`; optimisers as their `make_world_model`)


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
    """Adam for the world model (encoder at enc-lr-scale x lr) and for the policy, both after a global-norm clip.

    Clip and Adam see each network's parameters as one flat vector (`optax.flatten`): the same arithmetic, element
    for element, with the global norm summed in another order, as a few large operations instead of a few per
    parameter array (the world model has 60).  That drops a third of an update's operations, and with them compile
    time (README, "Speed")."""
    encoder_only = eqx.tree_at(lambda m: m.encoder, jax.tree.map(lambda _: False, model),
                               replace_fn=lambda encoder: jax.tree.map(lambda _: True, encoder))

    def clipped_adam(**adam_args):
        clip = optax.clip_by_global_norm(args.grad_clip_norm)
        return optax.flatten(optax.chain(clip, optax.adam(args.lr, **adam_args)))

    model_opt = optax.chain(clipped_adam(), optax.masked(optax.scale(args.enc_lr_scale), encoder_only))
    return model_opt, clipped_adam(eps=args.policy_adam_eps)


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


# ---------------------------------------------------------------------------------------------------------------------
# Training loop, in rounds of `sync-every` vector steps.  In each round an actor and a learner run side by side, on two
# host threads (the XLA CPU runtime runs one program's independent work one after another, so this is how a step keeps
# two cores busy, and how env steps overlap gradient updates): the actor plans and steps the envs with the agent as it
# was at the round's start, in a lax.scan; the learner stores the previous round's transitions in the replay buffer
# and makes the gradient updates owed for that round's steps, in a lax.scan.  The agent therefore acts with parameters
# one to two rounds old, as the authors' code acts with parameters up to 100 vector steps old (it updates in blocks).


class Actor(NamedTuple):
    """What the acting side carries from one vector step to the next; every field has a leading seed axis (N)."""

    env_state: tuple
    obs: jax.Array  # (N, E, O)
    ended: jax.Array  # (N, E) obs is the last of its episode: the next action only triggers the reset
    plan_mean: jax.Array  # (N, E, H, A) warm start of the planner
    episode_return: jax.Array  # (N, E)
    episode_cost: jax.Array  # (N, E)
    global_step: jax.Array  # (N,) raw training env steps, summed over envs; equal over seeds (lockstep)
    total_cost: jax.Array  # (N,) cumulative training cost (for the cost rate)
    key: jax.Array  # (N, 2)


class Runner(NamedTuple):
    """A whole run: agent, replay buffer, actor and the learner's key.  Between rounds it may owe the last round's
    storing and updates (see `play`); `play` returns it settled, with every transition stored and every update
    made, which is how rows, evaluations and checkpoints see it."""

    agent: Agent
    buffer: replay.Buffer
    actor: Actor
    key: jax.Array  # (N, 2) the learner's


class Round(NamedTuple):
    """One round's acting, as the learner takes it: transitions (obs, action, reward, cost, terminated, truncated),
    each (K, N, E, ...), and the per-step `active` and `learning` gates (K,)."""

    transitions: tuple
    active: jax.Array
    learning: jax.Array


class Train(NamedTuple):
    init: callable  # keys (N, 2) -> Runner
    act: callable  # (Actor, Agent, stop_at) -> (Actor, Round, metrics): a round of acting; agent and buffer untouched
    learn: callable  # (Agent, Buffer, key, Round) -> (Agent, Buffer, key, metrics): store a round, make its updates
    evaluate: callable  # (agents, keys (N, 2)) -> (returns, costs), each (N, eval_episodes), of full eval episodes


def zeros_like_output(fn, *args):
    """Zeros shaped like fn(*args)'s output, for the idle branch of a lax.cond.  `fn` is jitted: then the busy
    branch's call fn(*args) reuses the trace made here (jit's trace cache) instead of tracing fn a second time."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *args))


def skipped(fn):
    """The idle branch for lax.cond(busy, fn, skipped(fn), state, ...): the state passes through unchanged, and the
    rest of fn's outputs are zeros."""
    return lambda state, *rest: (state, *zeros_like_output(fn, state, *rest)[1:])


def split(keys, num):
    """Split each seed's key: (N, 2) -> `num` arrays of (N, 2), as `jax.random.split` would for one seed."""
    return jnp.swapaxes(jax.vmap(lambda key: jax.random.split(key, num))(keys), 0, 1)


def make_train(args, env, eval_env):
    """Pure functions of a SPOWL run over N seeds (PureJaxRL-style); `env` / `eval_env` are batched `Env`s.

    Each seed is an independent run: its work is `vmap`ped, and only the env step -- one call for all seeds, a single
    host callback on Safety-Gymnasium -- sits outside.  Seeds step in lockstep, so the gates (random phase, round
    end) come from seed 0 and stay real branches: under a vmapped `lax.cond` with per-seed predicates both branches
    would run.
    """
    num_envs, horizon = args.num_envs, args.horizon
    steps_per_vector_step = num_envs * env.action_repeat
    # A round covers `sync-every` vector steps, or the smallest event interval if that is shorter.  Steps past
    # `stop_at` are skipped (episode resets add 0 steps, so a round may fall short of an event; the driver then runs
    # another).
    interval = -(-min(args.log_every, args.eval_every, args.checkpoint_every) // steps_per_vector_step) + 1
    round_length = min(args.sync_every, interval)

    def init(keys):
        key_agent, key_env, key_actor, key = split(keys, 4)
        agent = jax.vmap(lambda k: init_agent(k, args, env.obs_dim, env.action_dim))(key_agent)
        env_state, obs = env.reset(key_env)

        def new_buffer(obs):  # one seed's, holding the first observations
            buffer = replay.init(num_envs, args.buffer_size // num_envs, env.obs_dim, env.action_dim)
            zeros = jnp.zeros(num_envs)
            return replay.add(buffer, obs, jnp.zeros((num_envs, env.action_dim)), zeros, zeros, zeros > 0, zeros > 0)

        zeros = jnp.zeros(obs.shape[:2])
        actor = Actor(env_state, obs, zeros > 0, jnp.zeros((*obs.shape[:2], horizon, env.action_dim)), zeros, zeros,
                      jnp.zeros(obs.shape[0], jnp.int32), jnp.zeros(obs.shape[0]), key_actor)
        return Runner(agent, jax.vmap(new_buffer)(obs), actor, key)

    plan = jax.jit(lambda agent, obs, plan_mean, key: act(agent.model, agent.policy, obs, plan_mean, key, args))

    def choose_action(agent, actor, key, learning):  # one seed: plan (Alg. 2) once learning, uniform random before
        def random(agent, obs, plan_mean, key):
            action = jax.random.uniform(key, (num_envs, env.action_dim), minval=-1, maxval=1)
            return action, plan_mean, zeros_like_output(plan, agent, obs, plan_mean, key)[2]

        return jax.lax.cond(learning, plan, random, agent, actor.obs, actor.plan_mean, key)

    def env_step(actor, agent, learning):
        """One vector step of every seed: act, step the envs, count.  Returns the actor, the transition to store and
        the step's metrics."""
        key, key_act, key_env = split(actor.key, 3)
        action, plan_mean, act_info = jax.vmap(choose_action, in_axes=(0, 0, 0, None))(agent, actor, key_act, learning)
        env_state, obs, reward, cost, terminated, truncated, raw_steps = env.step(actor.env_state, action, key_env)
        resetting = actor.ended  # this step only reset those envs: store the reset obs as an episode start
        transition = (obs, jnp.where(resetting[..., None], 0.0, action), reward, cost, terminated, truncated)
        ended = terminated | truncated
        episode_return = jnp.where(resetting, 0.0, actor.episode_return) + reward
        episode_cost = jnp.where(resetting, 0.0, actor.episode_cost) + cost
        global_step = actor.global_step + raw_steps.sum(-1)
        actor = Actor(env_state, obs, ended, jnp.where(resetting[..., None, None], 0.0, plan_mean), episode_return,
                      episode_cost, global_step, actor.total_cost + cost.sum(-1), key)
        metrics = {"ended": ended, "episode_return": episode_return, "episode_cost": episode_cost,
                   "global_step": global_step,
                   **jax.tree.map(lambda x: x.mean(-1), act_info)}  # planner and switch diagnostics, mean over envs
        return actor, transition, metrics

    step = jax.jit(env_step)

    def act_round(actor, agent, stop_at):
        """Up to `round_length` vector steps with the agent fixed, stopping at global step `stop_at`."""

        def gated_step(actor, _):
            active = actor.global_step[0] < stop_at
            learning = actor.global_step[0] >= args.learning_starts
            actor, transition, metrics = jax.lax.cond(active, step, skipped(step), actor, agent, learning)
            return actor, (transition, active, learning, metrics)

        actor, (transitions, active, learning, metrics) = jax.lax.scan(gated_step, actor, None, length=round_length)
        shape = metrics["global_step"].shape  # (K, N)
        gates = {"active": jnp.broadcast_to(active[:, None], shape),
                 "learning": jnp.broadcast_to(learning[:, None], shape)}
        return actor, Round(transitions, active, learning), {**metrics, **gates}

    def gradient_updates(agent, buffer, key):  # one seed: num-envs x utd-ratio updates (Eq. 5-10)
        def one_update(agent, key):
            key_sample, key_update = jax.random.split(key)
            return update(agent, replay.sample(buffer, key_sample, args.batch_size, horizon), key_update, args)

        agent, info = jax.lax.scan(one_update, agent, jax.random.split(key, round(num_envs * args.utd_ratio)))
        return agent, jax.tree.map(jnp.mean, info)

    updates = jax.jit(jax.vmap(gradient_updates))

    def learn(agent, buffer, key, acted):
        """Store a round's transitions, then make the updates owed for its learning steps, one vector step's worth
        (num-envs x utd-ratio) per step, on the buffer that holds them all.  Returns the agent, buffer, next key and
        per-step metrics (K, N)."""

        def store(buffer, inputs):
            transition, active = inputs
            return jax.lax.cond(active, jax.vmap(replay.add), lambda b, *_: b, buffer, *transition), None

        buffer, _ = jax.lax.scan(store, buffer, (acted.transitions, acted.active))
        key, key_updates = split(key, 2)

        def learn_step(agent, inputs):
            keys, owed = inputs
            owed = owed & (buffer.size[0] > horizon)  # a window of horizon+1 entries must fit
            agent, info = jax.lax.cond(owed, updates, skipped(updates), agent, buffer, keys)
            metrics = {"multiplier": agent.multiplier, "penalty": agent.penalty,
                       "param_norm": jax.vmap(lambda a: optax.tree.norm(
                           eqx.filter((a.model, a.policy), eqx.is_inexact_array)))(agent), **info}
            return agent, metrics

        keys = jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, round_length))(key_updates), 0, 1)  # (K, N, 2)
        agent, metrics = jax.lax.scan(learn_step, agent, (keys, acted.active & acted.learning))
        return agent, buffer, key, metrics

    def evaluate(agent, keys):
        """`eval_episodes` full episodes per seed in eval mode (see `act`), `eval_env.num_envs` at a time from fresh
        resets: returns and costs (N, eval_episodes)."""
        eval_act = jax.vmap(lambda agent, obs, plan_mean, key: act(agent.model, agent.policy, obs, plan_mean, key, args,
                                                                   eval_mode=True))

        def episode_batch(keys):
            key_reset, key = split(keys, 2)
            env_state, obs = eval_env.reset(key_reset)
            plan_mean = jnp.zeros((*obs.shape[:2], horizon, eval_env.action_dim))

            def eval_step(carry, keys):
                env_state, obs, plan_mean, done, total_return, total_cost = carry
                key_act, key_env = split(keys, 2)
                action, plan_mean, _ = eval_act(agent, obs, plan_mean, key_act)
                env_state, obs, reward, cost, terminated, truncated, _ = eval_env.step(env_state, action, key_env)
                total_return, total_cost = total_return + (~done) * reward, total_cost + (~done) * cost
                return (env_state, obs, plan_mean, done | terminated | truncated, total_return, total_cost), None

            zeros = jnp.zeros(obs.shape[:2])
            carry = (env_state, obs, plan_mean, zeros > 0, zeros, zeros)
            carry, _ = jax.lax.scan(eval_step, carry, split(key, eval_env.episode_steps))
            return carry[-2], carry[-1]  # (N, E)

        batches = -(-args.eval_episodes // eval_env.num_envs)
        returns, costs = jax.lax.map(episode_batch, split(keys, batches))  # (batches, N, E)
        per_seed = lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[1], -1)[:, :args.eval_episodes]  # noqa: E731
        return per_seed(returns), per_seed(costs)

    return Train(init, act_round, learn, evaluate)


# ---------------------------------------------------------------------------------------------------------------------
# Driver: input checks, run directory, logging, evaluation, checkpoints

RESUMABLE_FLAGS = {"total_timesteps", "resume", "log_dir", "progress_bar", "track", "max_env_workers"}  # may differ


def flag(name):
    return "--" + name.replace("_", "-")


def check_args(args):
    """Raises ValueError naming the offending flag.  Runs before any env starts or anything compiles."""
    positive = ["total_timesteps", "num_seeds", "num_envs", "log_every", "eval_every", "eval_episodes",
                "checkpoint_every", "sync_every", "action_repeat", "buffer_size", "utd_ratio", "batch_size",
                "latent_dim", "mlp_dim", "enc_dim", "num_enc_layers", "simnorm_dim", "num_q", "num_cost_heads",
                "num_bins", "horizon", "iterations", "num_samples", "num_pi_trajs", "num_elites", "q_subsample",
                "cost_subsample", "ci_resamples", "lr", "tau", "gamma", "cost_gamma", "temperature", "min_std",
                "penalty_init"]
    for name in positive:
        if not getattr(args, name) > 0:
            raise ValueError(f"{flag(name)} must be positive, got {getattr(args, name)}")
    for name in ["learning_starts", "lagrange_init", "penalty_growth", "dropout", "cost_dropout"]:
        if not getattr(args, name) >= 0:
            raise ValueError(f"{flag(name)} must not be negative, got {getattr(args, name)}")
    for small, large in [("num_elites", "num_samples"), ("q_subsample", "num_q"), ("cost_subsample", "num_cost_heads"),
                         ("min_std", "max_std"), ("log_std_min", "log_std_max"), ("vmin", "vmax")]:
        if getattr(args, small) > getattr(args, large):
            raise ValueError(f"{flag(small)} ({getattr(args, small)}) must not exceed {flag(large)} "
                             f"({getattr(args, large)})")
    if (args.num_envs * args.utd_ratio) % 1:
        raise ValueError(f"--num-envs x --utd-ratio ({args.num_envs} x {args.utd_ratio}) must be a whole number of "
                         "updates per vector step")
    if args.ci_thresholds and args.switch_rule == "mean":
        raise ValueError("--ci-thresholds takes d_R, d_c from the policy action's bootstrap interval, which "
                         "--switch-rule mean does not compute; use it with --switch-rule ci")
    if args.num_pi_trajs >= args.num_samples:
        raise ValueError(f"--num-pi-trajs ({args.num_pi_trajs}) must be below --num-samples ({args.num_samples})")
    if args.latent_dim % args.simnorm_dim:
        raise ValueError(f"--latent-dim ({args.latent_dim}) must be a multiple of --simnorm-dim ({args.simnorm_dim})")
    if args.buffer_size // args.num_envs <= args.horizon + 1:
        raise ValueError(f"--buffer-size ({args.buffer_size}) must hold more than horizon+1 steps per env")
    if args.env_id in envs.JAX_ENVS:
        if args.capture_video:
            raise ValueError(f"--capture-video needs a Safety-Gymnasium task, not --env-id {args.env_id}")
    else:
        envs.check_env_id(args.env_id)
        if max(args.num_envs, args.eval_episodes) > envs.MAX_ENVS_PER_KIND:
            name = "num_envs" if args.num_envs > envs.MAX_ENVS_PER_KIND else "eval_episodes"
            raise ValueError(f"{flag(name)} must be at most {envs.MAX_ENVS_PER_KIND} (env seeds are assigned in "
                             f"blocks of {envs.ENV_SEED_STRIDE} per run seed)")
        limit = args.max_env_workers or max(32, 4 * (os.cpu_count() or 1))
        if envs.num_workers(args) > limit:
            raise ValueError(f"--max-env-workers: {args.num_seeds} seeds x ({args.num_envs} envs + "
                             f"{min(args.eval_episodes, args.num_envs)} eval envs) = {envs.num_workers(args)} env "
                             f"worker processes exceed the limit of {limit}; use fewer seeds or envs, or raise it")
    if args.max_env_workers is not None and args.max_env_workers < 1:
        raise ValueError(f"--max-env-workers must be positive, got {args.max_env_workers}")
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("--track needs Weights & Biases: pip install wandb") from None


def resolve_act(args):
    """--act left out: the switch (Alg. 2), or plan only under --planner tdmpc2, so that `--planner tdmpc2` alone is
    the unsafe TD-MPC2 baseline of Sec. 5.4 (a switch would still consult the cost values)."""
    if args.act is not None:
        return args
    return dataclasses.replace(args, act="plan" if args.planner == "tdmpc2" else "switch")


def prepare_run(args, cli_flags):
    """Resolve --act, --resume and --log-dir into (args, resuming?).  Never touches an existing run.

    The resolved --act is what config.json stores, so a resumed run acts as it did."""
    if args.resume is None:
        args = resolve_act(args)
        check_args(args)
        log_dir = args.log_dir or f"runs/{args.env_id}__{args.seed}__{int(time.time())}"
        if os.path.exists(log_dir):
            raise ValueError(f"--log-dir {log_dir} already exists (continue it with --resume {log_dir})")
        return dataclasses.replace(args, log_dir=log_dir), False
    config_path = os.path.join(args.resume, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"--resume {args.resume}: no run directory with a config.json there")
    if args.log_dir is not None and os.path.abspath(args.log_dir) != os.path.abspath(args.resume):
        raise ValueError(f"--log-dir {args.log_dir} must be the --resume directory {args.resume} (or left out)")
    with open(config_path) as f:
        saved = Args(**json.load(f))
    for name in cli_flags - RESUMABLE_FLAGS:
        if getattr(args, name) != getattr(saved, name):
            raise ValueError(f"{flag(name)} differs from the saved config of {args.resume}; leave it out to resume")
    overrides = {name: getattr(args, name) for name in cli_flags & (RESUMABLE_FLAGS - {"resume", "log_dir"})}
    args = dataclasses.replace(saved, resume=args.resume, log_dir=args.resume, **overrides)
    check_args(args)
    checkpoint_counters(args.resume)  # readable, and in this code's format
    return args, True


PROVENANCE_PACKAGES = ["jax", "jaxlib", "equinox", "optax", "numpy", "safety-gymnasium", "mujoco"]


def record_provenance(run_dir):
    """Append one line for this launch (fresh or --resume) to <run>/provenance.jsonl: the code's git commit and
    whether its tree was dirty, the command line and time, the host and JAX devices, and the library versions.
    Anything unavailable (no git, a package not installed) is recorded as null."""

    def git(*command):
        try:
            return subprocess.run(["git", *command], cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
                                  capture_output=True, text=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    status = git("status", "--porcelain")  # before this launch writes anything, so its own files do not count
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
             "commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status),
             "host": socket.gethostname(), "device_kind": jax.devices()[0].device_kind,
             "device_count": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS"),
             "versions": {"python": platform.python_version(), **{p: version(p) for p in PROVENANCE_PACKAGES}}}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "provenance.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


# The checkpoint format: `format_version`, `counters` (JSON: the event counters and the checkpoint's global_step) and
# the runner's leaves `arr_0`, `arr_1`, ... in `jax.tree.leaves` order.  A change of the runner or of the counters
# (new state) increments the version, and --resume then refuses older checkpoints in one line.
CHECKPOINT_FORMAT = 2


def save_checkpoint(run_dir, runner, counters):
    """Everything to continue the run -- parameters, optimiser and Lagrangian state, replay buffer, env state, PRNG
    key and counters -- as one `checkpoint.npz`.  It is written to `checkpoint.npz.tmp`, flushed to disk and renamed,
    so a kill or a failed write at any moment leaves the previous checkpoint whole; a failed write removes the
    temporary file and raises OSError."""
    path = os.path.join(run_dir, "checkpoint.npz")
    data = io.BytesIO()  # built in memory: a zip file that failed halfway on disk would complain again when collected
    np.savez(data, format_version=CHECKPOINT_FORMAT, counters=json.dumps(counters),
             *jax.device_get(jax.tree.leaves(runner)))
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        os.remove(path + ".tmp")
        raise
    os.replace(path + ".tmp", path)


def checkpoint_counters(run_dir):
    """The counters of the checkpoint in `run_dir`; ValueError unless it is one this code wrote, in this format."""
    path = os.path.join(run_dir, "checkpoint.npz")
    try:
        with np.load(path) as data:
            version = int(data["format_version"]) if "format_version" in data.files else None
            counters = json.loads(str(data["counters"])) if version == CHECKPOINT_FORMAT else None
    except (OSError, ValueError, KeyError) as error:  # missing, not an npz, or foreign
        raise ValueError(f"--resume {run_dir}: cannot read {path} ({error})") from None
    if version != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {run_dir}: the checkpoint has format version {version or 'none (older code)'}, "
                         f"this code reads version {CHECKPOINT_FORMAT}")
    return counters


def load_checkpoint(run_dir, template):
    """The saved runner (into the structure of `template`) and counters; ValueError if they do not fit it."""
    counters = checkpoint_counters(run_dir)
    expected = jax.tree.leaves(template)
    with np.load(os.path.join(run_dir, "checkpoint.npz")) as data:
        leaves = [data[f"arr_{i}"] for i in range(sum(name.startswith("arr_") for name in data.files))]
    if [(x.shape, x.dtype) for x in leaves] != [(x.shape, x.dtype) for x in expected]:
        raise ValueError(f"--resume {run_dir}: the checkpoint's {len(leaves)} arrays do not match the {len(expected)} "
                         "of this code's runner (shapes and dtypes)")
    return jax.tree.unflatten(jax.tree.structure(template), [jnp.asarray(x) for x in leaves]), counters


@jax.vmap
def continue_episodes(restored, fresh):
    """A restored runner continuing in host envs that were just reset: take their fresh observations, and mark the
    last stored entry as an episode end (truncated) so no loss spans the gap.  (Per seed, mapped over seeds.)"""
    last = (restored.buffer.position - 1) % restored.buffer.truncated.shape[1]
    buffer = restored.buffer._replace(truncated=restored.buffer.truncated.at[:, last].set(True))
    new = fresh.actor
    zeros = jnp.zeros(new.obs.shape[0])
    buffer = replay.add(buffer, new.obs, jnp.zeros_like(new.plan_mean[:, 0]), zeros, zeros, zeros > 0, zeros > 0)
    actor = restored.actor._replace(obs=new.obs, ended=new.ended, plan_mean=new.plan_mean,
                                    episode_return=new.episode_return, episode_cost=new.episode_cost)
    return restored._replace(buffer=buffer, actor=actor)


class Logger:
    """One JSON object per row appended to <run>/metrics.jsonl, the same scalars as TensorBoard events (a writer per
    seed when several train at once), and W&B with --track.

    A run resumed from a checkpoint at `resume_step` runs the steps after it again, so metrics.jsonl keeps only its
    rows up to that step and TensorBoard purges its later events: both see each step once, in order."""

    def __init__(self, args, resume_step=None):
        from tensorboardX import SummaryWriter

        self.path = os.path.join(args.log_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as f:  # a line cut short by a kill has no newline and lies after the checkpoint
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["global_step"] <= resume_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        purge_step = None if resume_step is None else resume_step + 1
        seeds = [args.seed + i for i in range(args.num_seeds)]
        self.writers = {s: SummaryWriter(args.log_dir if args.num_seeds == 1 else f"{args.log_dir}/seed_{s}",
                                         purge_step=purge_step) for s in seeds}
        self.wandb = None
        if args.track:
            import wandb

            self.wandb = wandb.init(project=args.wandb_project, config=dataclasses.asdict(args), dir=args.log_dir,
                                    name=os.path.basename(os.path.normpath(args.log_dir)), resume="allow")

    def write(self, rows):
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        for row in rows:
            for tag, value in row.items():
                if tag not in ("global_step", "seed"):
                    self.writers[row["seed"]].add_scalar(tag, value, row["global_step"])
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in row.items() if k != "global_step"}, step=row["global_step"])

    def close(self):
        for writer in self.writers.values():
            writer.close()
        if self.wandb is not None:
            self.wandb.finish()


# Per-step scalars of the scan, averaged over learning steps between log rows, by their log keys.  The planner's
# diagnostics exist only where they apply: none under --act policy, thresholds and no_improvement only under
# --planner spowl, the switch's bounds only under --act switch.
METRIC_NAMES = {"consistency": "losses/consistency", "reward": "losses/reward", "value": "losses/value",
                "cost": "losses/cost", "cost_value": "losses/cost_value", "model_loss": "losses/model",
                "policy_loss": "losses/policy", "reward_loss": "losses/policy_reward", "psi": "losses/psi",
                "delta": "lagrange/delta", "scale": "policy/scale", "entropy": "policy/entropy",
                "q_target": "values/q_target", "cost_value_target": "values/cost_value_target",
                "used_plan": "plan/balance", "elites": "plan/elites", "no_improvement": "plan/no_improvement",
                "d_reward": "plan/d_reward", "d_cost": "plan/d_cost", "q_low": "switch/q_low",
                "qc_high": "switch/qc_high", "param_norm": "charts/param_norm"}
# A NaN or +-inf in any of these, or in lambda and mu, stops the run (`first_non_finite`).
CHECKED_NAMES = {**METRIC_NAMES, "multiplier": "lagrange/lambda", "penalty": "lagrange/mu"}


def first_non_finite(metrics, first_seed):
    """Names the earliest NaN or +-inf among a round's per-step losses, diagnostics, lambda, mu and parameter norm
    (numpy, (steps, seeds)), with its global step and seed; None if there is none."""
    found = []  # (step index, seed index, log key, name) of each quantity's first non-finite value
    for name, key in CHECKED_NAMES.items():
        bad = np.argwhere(~np.isfinite(metrics[name]) & metrics["active"]) if name in metrics else []
        if len(bad):
            found.append((*bad[0], key, name))
    if not found:
        return None
    t, i, key, name = min(found)
    also = sum(1 for other in found[1:] if other[:2] == (t, i))
    return (f"{key} became {metrics[name][t, i]} at step {metrics['global_step'][t, i]} (seed {first_seed + i})"
            + (f" (and {also} more there)" if also else ""))


class Tracker:
    """Accumulates one seed's per-step scan outputs between log rows."""

    def __init__(self):
        self.sums, self.learning_steps, self.returns, self.costs = {}, 0, [], []

    def add(self, metrics):  # metrics: this seed's round outputs, numpy arrays with a leading step axis
        active = metrics["active"]
        learning = active & metrics["learning"]
        for name in [n for n in METRIC_NAMES if n in metrics]:
            self.sums[name] = self.sums.get(name, 0.0) + float(metrics[name][learning].sum())
        self.learning_steps += int(learning.sum())
        ended = metrics["ended"] & active[:, None]
        self.returns += metrics["episode_return"][ended].tolist()
        self.costs += metrics["episode_cost"][ended].tolist()
        if active.any():
            self.last = {"lagrange/lambda": float(metrics["multiplier"][active][-1]),
                         "lagrange/mu": float(metrics["penalty"][active][-1])}

    def row(self):
        row = dict(getattr(self, "last", {}))
        if self.learning_steps:
            row.update({METRIC_NAMES[n]: total / self.learning_steps for n, total in self.sums.items()})
        if self.returns:
            row.update({"train/episode_return": float(np.mean(self.returns)),
                        "train/episode_cost": float(np.mean(self.costs))})
        self.__init__()
        return row


def record_video(args, agent, path, key, policy_act):
    """One eval-mode episode on a rendering env (skybox included), saved as an mp4.

    `policy_act` is `act` jitted in eval mode, built once per run so videos after the first do not recompile.  With
    several seeds, the video shows the first seed's agent.
    """
    import imageio

    env = envs.make_env(args.env_id, args.action_repeat, envs.video_env_seed(args.seed), render=True)
    obs, _ = env.reset()
    plan_mean = jnp.zeros((1, args.horizon, env.action_space.shape[0]))
    frames = [env.render()]
    for _ in range(-(-1000 // args.action_repeat)):
        key, key_act = jax.random.split(key)
        action, plan_mean, _ = policy_act(agent.model, agent.policy, obs[None], plan_mean, key_act)
        obs, _, _, _, info = env.step(np.asarray(action[0]))
        frames.append(env.render())
        if info["terminated"] or info["truncated"]:
            break
    env.close()
    imageio.mimsave(path, frames, fps=30)


def seed_mesh(num_seeds):
    """A one-axis mesh over the most local devices that divide the seeds evenly; says in one line what it uses."""
    devices = jax.local_devices()
    used = max(d for d in range(1, len(devices) + 1) if num_seeds % d == 0)
    print(f"JAX: {num_seeds} seed{'s' * (num_seeds > 1)} on {used} of {len(devices)} local "
          f"{devices[0].platform} device{'s' * (len(devices) > 1)} ({devices[0].device_kind})", flush=True)
    return Mesh(np.array(devices[:used]), ("seed",))


class RunStopped(Exception):
    """Ends a run early with one line for the user (`message`) and a non-zero exit `code`."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.message, self.code = message, code


class StopSignals:
    """SIGINT and SIGTERM while training.  The first asks the loop to stop at the next round boundary (`received`),
    where it writes a checkpoint; the second kills the env `workers` and exits at once, without one.

    The main thread spends a round inside XLA, where Python runs no signal handler, so a thread of its own acts on
    them: Python's C-level handler writes each signal's number to a "wakeup" pipe the moment it arrives."""

    def __init__(self):
        self.received, self.workers = None, []

    def __enter__(self):
        read, self.write = os.pipe()
        os.set_blocking(self.write, False)
        self.previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
        self.previous_fd = signal.set_wakeup_fd(self.write)
        threading.Thread(target=self.watch, args=(read,), daemon=True).start()
        return self

    def watch(self, read):
        while number := os.read(read, 1):  # empty once __exit__ closed the pipe
            if number[0] not in (signal.SIGINT, signal.SIGTERM):
                continue
            if self.received is None:
                self.received = signal.Signals(number[0])
                os.write(2, f"\n{self.received.name}: stopping at the end of this round (again: at once, without a "
                            "checkpoint)\n".encode())
                continue
            for vector_env in self.workers:
                for process in vector_env.processes:
                    process.kill()
            os._exit(128 + number[0])
        os.close(read)

    def __exit__(self, *exc_info):
        signal.set_wakeup_fd(self.previous_fd)
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        os.close(self.write)


def train(args, resuming):
    """Run (or continue) training in args.log_dir: rounds of actor and learner, settled at log / eval / checkpoints.

    Raises RunStopped on a stop signal (after a checkpoint), a NaN or inf, a failed env worker or a failed write
    (keeping the last checkpoint)."""
    record_provenance(args.log_dir)
    os.makedirs(args.log_dir, exist_ok=True)
    if not resuming:
        with open(os.path.join(args.log_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
    mesh = seed_mesh(args.num_seeds)
    if mesh.devices.flat[0].platform == "cpu" and max(args.latent_dim, args.num_samples) >= 256:
        print("note: near the paper's size a CPU takes seconds per planning call; the README's \"Speed\" section "
              "gives small-size flags for CPU runs", flush=True)
    with StopSignals() as signals:
        env, eval_env, signals.workers = envs.make_envs(args, mesh if mesh.size > 1 else None)
        try:
            return train_loop(args, resuming, mesh, env, eval_env, signals)
        except jax.errors.JaxRuntimeError:
            failure = next((v.failure for v in signals.workers if v.failure), None)
            if failure is None:
                raise
            raise RunStopped(f"error: {failure}; the last checkpoint is kept in {args.log_dir}") from None
        finally:
            for v in signals.workers:
                v.close(terminate=v.failure is not None)


def jit_over_seeds(fns, mesh):
    """`fns` jitted with the seed axis -- the leading axis of the runner and of the keys, the second of a round's
    transitions and per-step metrics -- split over the mesh's devices (`jit` partitions the rest); and that sharding
    of the seed axis.  The actor's state and the learner's buffer are updated in place (donated)."""
    by_seed, by_step_and_seed, replicated = (NamedSharding(mesh, PartitionSpec("seed")),
                                             NamedSharding(mesh, PartitionSpec(None, "seed")),
                                             NamedSharding(mesh, PartitionSpec()))
    by_round = Round(by_step_and_seed, replicated, replicated)
    return Train(jax.jit(fns.init, out_shardings=by_seed),
                 jax.jit(fns.act, donate_argnums=0, in_shardings=(by_seed, by_seed, replicated),
                         out_shardings=(by_seed, by_round, by_step_and_seed)),
                 jax.jit(fns.learn, donate_argnums=1, in_shardings=(by_seed, by_seed, by_seed, by_round),
                         out_shardings=(by_seed, by_seed, by_seed, by_step_and_seed)),
                 jax.jit(fns.evaluate, in_shardings=by_seed, out_shardings=by_seed)), by_seed


def compile_train(train, keys):
    """The run's programs, compiled ahead of time side by side on threads: a `Train` of futures of the compiled init,
    actor's and learner's rounds, and evaluation.  `keys` are the seeds' keys init will take.

    Tracing takes the GIL, so each program is traced in turn and starts compiling as soon as it is traced: the
    learner's first, as the longest to compile.  Meanwhile a run can already act (`when_compiled`, `play`).  On a CPU
    the actor's, the evaluation's and init's programs compile at XLA's optimisation level 1: in about half the time,
    for planning calls a few % slower, which the learner's longer rounds hide.  The learner's stays at the default
    level, where gradient updates run about 1.6x faster (README, "Speed")."""
    quick = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None
    runner = jax.eval_shape(train.init, keys)
    round_shapes = jax.eval_shape(train.act, runner.actor, runner.agent, 0)[1]
    pool = ThreadPoolExecutor(4)
    compile_ = lambda lowered, options: pool.submit(lowered.compile, compiler_options=options)  # noqa: E731
    learn = compile_(train.learn.lower(runner.agent, runner.buffer, runner.key, round_shapes), None)
    act = compile_(train.act.lower(runner.actor, runner.agent, 0), quick)
    init = compile_(train.init.lower(keys), quick)
    evaluate = compile_(train.evaluate.lower(runner.agent, keys), quick)
    pool.shutdown(wait=False)  # the compiles go on
    return Train(init, act, learn, evaluate)


def when_compiled(compiling):
    """A `Train` of futures of compiled programs as a `Train` of functions, each of which waits for its program."""
    return Train(*(functools.partial(lambda future, *args: future.result()(*args), future) for future in compiling))


def done_now(fn):
    """fn() as an already finished future: an executor's `submit`, run on the calling thread."""
    future = Future()
    future.set_result(fn())
    return future


def learn_after(train, previous, acted):
    """The learner's part of a round: store `acted` and make its updates, on the learner's state after the rounds
    before it (`previous`, a future).  Returns the agent, buffer, next key and per-step metrics."""
    agent, buffer, key, _ = previous.result()
    return jax.block_until_ready(train.learn(agent, buffer, key, acted))


def play(train, runner, stop_at, learner=None, on_round=lambda metrics: None, interrupted=lambda: False):
    """Rounds until global step `stop_at` (or, at a round boundary, until `interrupted()`), then the learner's last,
    so the runner owes nothing.  `on_round` gets each round's metrics, the actor's and the learner's, (steps, seeds,
    ...), in order, once its updates are made.

    The actor plays round k with the agent that has learned from the rounds up to k-2, while the learner -- on the
    `learner` thread pool, or after the actor without one: the same result -- stores round k-1 and makes its updates.
    A round without learning steps (the random phase) leaves the agent as it was, so until a round owes updates the
    actor plays on without waiting for the learner: at a run's start the random phase plays while the learner's
    program still compiles."""
    submit = learner.submit if learner is not None else done_now
    agent, actor = runner.agent, runner.actor  # the agent the actor plays with
    state = done_now(lambda: (runner.agent, runner.buffer, runner.key, None))  # the learner's, after the rounds given
    last_two = collections.deque(maxlen=2)  # the last two rounds: (the learner's future, whether it owes updates)
    unseen = collections.deque()  # rounds `on_round` has not seen yet: (the learner's future, the actor's metrics)

    def show(future, metrics):
        on_round({**metrics, **future.result()[3]})

    while int(np.asarray(actor.global_step)[0]) < stop_at and not interrupted():  # numpy: no program to compile
        if len(last_two) == 2 and last_two[0][1]:  # round k-2 owes updates: wait for them
            agent = last_two[0][0].result()[0]
        actor, acted, metrics = jax.block_until_ready(train.act(actor, agent, stop_at))
        state = submit(functools.partial(learn_after, train, state, acted))
        last_two.append((state, bool(np.any(np.asarray(acted.active) & np.asarray(acted.learning)))))
        unseen.append((state, metrics))
        while unseen and unseen[0][0].done():
            show(*unseen.popleft())
    while unseen:
        show(*unseen.popleft())
    agent, buffer, key, _ = state.result()
    return Runner(agent, buffer, actor, key)


def train_loop(args, resuming, mesh, env, eval_env, signals):
    """`train`'s loop, on envs that are up: compile, restore, play rounds, log, evaluate, checkpoint, stop."""
    train, by_seed = jit_over_seeds(make_train(args, env, eval_env), mesh)
    video_act = jax.jit(functools.partial(act, cfg=args, eval_mode=True)) if args.capture_video else None
    seed_keys = lambda key: jax.device_put(jnp.stack(key), by_seed)  # noqa: E731
    keys = seed_keys([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])
    train = when_compiled(compile_train(train, keys))
    runner = train.init(keys)
    counters = {"next_log": args.log_every, "next_eval": args.eval_every, "next_checkpoint": args.checkpoint_every}
    step = lambda: int(np.max(jax.device_get(runner.actor.global_step)))  # noqa: E731  (equal over seeds)
    saved_step = None  # the step of the last complete checkpoint
    if resuming:
        try:
            restored, counters = load_checkpoint(args.log_dir, runner)
        except ValueError as error:
            raise RunStopped(f"error: {error}") from None
        runner = jax.device_put(continue_episodes(restored, runner) if signals.workers else restored, by_seed)
        saved_step = step()

    def kept():
        return "no checkpoint was written yet" if saved_step is None else f"the checkpoint of step {saved_step} is kept"

    def checkpoint(now):
        nonlocal saved_step
        try:
            save_checkpoint(args.log_dir, runner, {**counters, "global_step": now})
        except OSError as error:
            raise RunStopped(f"error: writing the checkpoint of step {now} failed ({error}); {kept()}") from None
        saved_step = now

    logger, trackers = Logger(args, saved_step), [Tracker() for _ in range(args.num_seeds)]
    bar = None
    if args.progress_bar:
        from tqdm import tqdm

        bar = tqdm(total=args.total_timesteps, initial=min(step(), args.total_timesteps), unit="step",
                   dynamic_ncols=True)

    def record(metrics):  # a round's actor and learner metrics, (steps, seeds, ...): check, track, show
        metrics = jax.device_get(metrics)
        non_finite = first_non_finite(metrics, args.seed)
        if non_finite is not None:
            raise RunStopped(f"error: {non_finite}; {kept()}")
        for i, tracker in enumerate(trackers):
            tracker.add(jax.tree.map(lambda x: x[:, i], metrics))
        if bar is not None:
            bar.update(min(int(metrics["global_step"].max()), args.total_timesteps) - bar.n)

    def write(rows):
        try:
            logger.write(rows)
        except OSError as error:
            raise RunStopped(f"error: writing the metrics of step {rows[0]['global_step']} failed ({error}); "
                             f"{kept()}") from None

    def evaluate(agent, now):  # on the evaluator's thread: returns and costs (seeds, episodes), and the video
        video_key, *eval_keys = jax.random.split(jax.random.PRNGKey(now + args.seed), args.num_seeds + 1)
        returns, costs = jax.device_get(train.evaluate(agent, seed_keys(eval_keys)))
        if args.capture_video:
            os.makedirs(os.path.join(args.log_dir, "videos"), exist_ok=True)
            record_video(args, jax.tree.map(lambda x: x[0], agent), os.path.join(args.log_dir, "videos",
                                                                                 f"eval_{now}.mp4"), video_key, video_act)
        return returns, costs

    evaluation = None  # (future, rows): an evaluation running beside training, and the rows it completes

    def finish_evaluation():  # wait for the running evaluation, if any, and write its rows
        nonlocal evaluation, eval_note
        if evaluation is None:
            return
        (future, rows), evaluation = evaluation, None
        returns, costs = future.result()
        for i, row in enumerate(rows):
            row.update({"eval/return_mean": float(returns[i].mean()), "eval/return_std": float(returns[i].std()),
                        "eval/cost_mean": float(costs[i].mean()), "eval/cost_std": float(costs[i].std())})
        eval_note = f"eval return {returns.mean():.1f} cost {costs.mean():.1f}"
        write(rows)

    last_time, last_step, eval_note = time.time(), step(), ""
    learner, evaluator = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    try:
        while step() < args.total_timesteps:
            if signals.received is not None:  # between rounds, with nothing owed: the runner is whole
                finish_evaluation()
                if step() != saved_step:
                    checkpoint(step())
                raise RunStopped(f"{signals.received.name}: stopped at step {saved_step} with a checkpoint; continue "
                                 f"with: python spowl.py --resume {args.log_dir}", 128 + signals.received)
            stop_at = min(counters["next_log"], counters["next_eval"], counters["next_checkpoint"],
                          args.total_timesteps)
            runner = play(train, runner, stop_at, learner, record, lambda: signals.received is not None)
            now = step()
            if now < stop_at:
                continue  # a stop signal came
            done = now >= args.total_timesteps
            fired = {name for name, every in [("log", args.log_every), ("eval", args.eval_every),
                                               ("checkpoint", args.checkpoint_every)]
                     if done or now >= counters["next_" + name]}
            for name in fired:
                every = getattr(args, f"{name}_every")
                counters["next_" + name] = (now // every + 1) * every
            finish_evaluation()  # its rows come before these
            rows = [{"global_step": now, "seed": args.seed + i} for i in range(args.num_seeds)]
            if "log" in fired:
                sps, last_step = (now - last_step) / (time.time() - last_time), now
                total_cost = jax.device_get(runner.actor.total_cost)
                for i, row in enumerate(rows):
                    row.update(trackers[i].row(), **{"train/cost_rate": float(total_cost[i]) / now, "charts/SPS": sps})
            if "eval" in fired:  # runs beside the next rounds, unless a checkpoint or the run's end must wait for it
                evaluation = (evaluator.submit(evaluate, runner.agent, now), rows)
                if done or "checkpoint" in fired:
                    finish_evaluation()
            else:
                write(rows)
            if "checkpoint" in fired:
                checkpoint(now)
            if "log" in fired:
                last_time = time.time()  # SPS counts training only, not the checkpoint or an evaluation waited for
                if bar is not None:
                    bar.set_postfix_str(f"{sps:.0f} sps {eval_note}")
    finally:
        learner.shutdown(cancel_futures=True)
        evaluator.shutdown(cancel_futures=True)  # waits for a running evaluation, which uses the eval envs
        if bar is not None:
            bar.close()
        logger.close()
    return runner


def configure(argv):
    """The run's config from command-line flags: (args, resuming?).  Raises ValueError naming the offending flag."""
    args = tyro.cli(Args, args=argv)
    if args.capture_video:  # must precede the first import of mujoco (checking --env-id imports it)
        os.environ.setdefault("MUJOCO_GL", "egl")
    cli_flags = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return prepare_run(args, cli_flags & {f.name for f in dataclasses.fields(Args)})


def main():
    try:
        args, resuming = configure(sys.argv[1:])
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        train(args, resuming)
    except RunStopped as stop:
        print(stop.message, file=sys.stderr, flush=True)
        sys.exit(stop.code)


if __name__ == "__main__":
    main()
