"""SPOWL -- Safe Planning and Policy Optimization via World Model Learning -- in JAX.

The algorithm, top-down: the config (`Args`), the agent and its update, and `make_train`, the pure functions of a
run.  Its parts: world_model.py, policy.py (the safe policy), planner.py (planner and switch) and buffer.py; driver.py
runs the functions (threads, logging, evaluations, checkpoints).  `python spowl.py [small] --env-id ENV`.
"""

import dataclasses
import functools
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import buffer as replay
import driver
import envs
import world_model
from envs import split_keys
from planner import act, elite_rule, uses_cost
from policy import (Lagrangian, cost_per_episode, init_lagrangian, init_policy, policy_grad_norms, policy_loss,
                    sample_action, update_lagrangian)
from world_model import encode, init_world_model, targets, td_targets, update_targets, world_model_loss


@dataclass(frozen=True)
class Args:
    # Experiment
    env_id: str = "SafetyPointGoal1-v0"  # a Safety-Gymnasium task, or JaxPointGoal1-v0 (the pure-JAX test-bed)
    seed: int = 1  # seed of the run (networks, planner, envs)
    num_seeds: int = 1  # train seeds seed, seed+1, ... at once, vmapped in one program
    total_timesteps: int = 5_000_000  # raw training env steps, summed over envs
    num_envs: int = 10  # parallel training envs
    learning_starts: int = 5_000  # raw env steps of uniform random actions before planning and updates start
    eval_episodes: int = 10  # full episodes per evaluation

    # Agent modes (Sec. 5.1-5.2)
    planner: Literal["spowl", "tdmpc2", "cce"] = "spowl"  # elite rule: Alg. 1, TD-MPC2 (unsafe), constrained CE
    act: Optional[Literal["switch", "plan", "policy"]] = None  # unset: switch (Alg. 2), or plan under tdmpc2

    # Environment and schedule (Sec. 5; the authors' `spowl/configs/config.yaml`)
    action_repeat: int = 5  # raw env steps per agent step, reward and cost summed (Safety-Gymnasium only)
    buffer_size: int = 1_000_000  # replay capacity in transitions, over all envs
    utd_ratio: float = 1.0  # gradient updates per agent transition collected
    batch_size: int = 256  # windows of horizon+1 steps per gradient update

    # World model (Sec. 4.1, Fig. 1, Eq. 5-6; the authors' `spowl/configs/agent/spowl.yaml`)
    latent_dim: int = 512  # latent size (a multiple of simnorm-dim)
    mlp_dim: int = 512  # hidden width of dynamics, heads and policy
    enc_dim: int = 256  # hidden width of the encoder
    num_enc_layers: int = 2  # encoder layers, at least one hidden layer as in the authors' code
    simnorm_dim: int = 8  # SimNorm group size
    num_q: int = 5  # Q ensemble size
    num_cost_heads: int = 5  # cost-head and cost-value ensemble sizes
    dropout: float = 0.01  # dropout on the first layer of the Q and cost-value heads
    cost_dropout: float = 0.0  # dropout on the first layer of the cost heads, in the world-model loss only
    num_bins: int = 101  # bins of the discrete regression
    vmin: float = -10.0  # lowest bin, in symlog space
    vmax: float = 10.0  # highest bin, in symlog space
    gamma: float = 0.975  # reward discount
    cost_gamma: float = 0.997  # cost discount
    rho: float = 0.5  # temporal weight rho^t of the losses over the horizon (lambda of Eq. 5, 7)
    consistency_coef: float = 20.0  # latent consistency loss coefficient
    reward_coef: float = 0.1  # reward loss coefficient
    value_coef: float = 0.1  # value loss coefficient
    cost_coef: float = 0.1  # cost loss coefficient
    cost_value_coef: float = 0.1  # cost-value loss coefficient
    cost_imb_weight: float = 10.0  # cost-loss weight of samples with cost > 0
    q_subsample: int = 2  # Q heads drawn for min (TD target) or average (policy, planner, switch)
    cost_subsample: int = 5  # cost-value heads drawn for aggregation (Fig. 8)
    cost_target_agg: Literal["min", "max", "avg"] = "avg"  # cost-value aggregation in the TD target (Eq. 6, Fig. 7)
    tau: float = 0.01  # EMA rate of the target ensembles
    cost_tau: Optional[float] = None  # not the paper's: EMA rate of the cost-value target; unset: tau
    lr: float = 3e-4  # learning rate of world model and policy
    enc_lr_scale: float = 0.3  # encoder learning-rate factor
    grad_clip_norm: float = 20.0  # global gradient-norm clip
    policy_adam_eps: float = 1e-5  # Adam epsilon of the policy optimiser

    # Safe policy (Sec. 4.2, Eq. 7-10)
    log_std_min: float = -10.0  # lower bound of the policy log-std
    log_std_max: float = 2.0  # upper bound of the policy log-std
    entropy_coef: float = 1e-4  # entropy coefficient alpha_H
    scale_tau: float = 0.01  # rate of the running Q scale S
    stop_scale_grad: bool = False  # stop the gradient through S (the authors' code does not)
    cost_limit: float = 0.1  # b: the cost-value limit
    delta_agg: Literal["avg", "max"] = "avg"  # cost-value aggregation in the violation Delta (Fig. 8)
    lagrange_init: float = 1e-6  # initial multiplier lambda
    penalty_init: float = 5e-9  # initial penalty mu
    penalty_growth: float = 5e-6  # penalty growth rate nu: mu <- min(mu (1 + nu), penalty-max)
    penalty_max: float = 1.0  # upper bound of mu
    lagrange_max: float = 10.0  # upper bound of lambda (inf: the paper's; 0, with --lagrange-init 0: held at 0)
    episode_cost_limit: Optional[float] = None  # not the paper's: lambda steps on measured episode costs
    multiplier_lr: float = 2e-6  # lambda's step per update per unit of episode cost over --episode-cost-limit

    # Planner (Sec. 4.3-4.4 and 5.1, Eq. 11-12, Alg. 1-2)
    horizon: int = 3  # planning and training horizon H
    iterations: int = 6  # MPPI iterations
    num_samples: int = 512  # action sequences per iteration, policy prior included
    num_pi_trajs: int = 24  # policy-prior sequences
    num_elites: int = 64  # elites k
    temperature: float = 0.5  # MPPI temperature (multiplies the score)
    min_std: float = 0.05  # lower bound of the sampling std
    max_std: float = 2.0  # initial and upper sampling std
    restrict_elites: bool = True  # cap the improvement set to the top-k by J (Alg. 1)
    ci_thresholds: bool = False  # use the policy action's bootstrap bounds as d_R, d_c instead of the prior's means
    plan_cost_agg: Literal["mean", "max"] = "mean"  # J_c's cost aggregation (authors: mean; Eq. 11: max)
    switch_rule: Literal["ci", "mean"] = "ci"  # switch bounds: bootstrap interval (authors) or means (Alg. 2)
    ci_resamples: int = 1_000  # bootstrap resamples of the switch's interval
    cce_threshold: float = 0.1  # d_plan of the CCE planner
    cce_estimate: Literal["local", "global"] = "local"  # CCE's J_c: immediate costs only, or with the cost value

    # Run machinery (driver.py): none of these changes what an agent learns, except --sync-every (docs/rounds.md)
    log_every: int = 5_000  # raw env steps between log rows
    eval_every: int = 50_000  # raw env steps between evaluations
    checkpoint_every: int = 100_000  # raw env steps between checkpoints (the latest one is kept)
    log_dir: Optional[str] = None  # run directory; default runs/{env_id}__{seed}__{time}
    resume: Optional[str] = None  # a run directory to continue with its saved config
    track: bool = False  # log to Weights & Biases as well
    wandb_project: str = "spowl"  # W&B project name
    capture_video: bool = False  # save a video of one eval episode per evaluation (headless: MUJOCO_GL=egl or osmesa)
    progress_bar: bool = True  # show a progress bar
    diagnostics: bool = False  # also log the policy loss parts' gradient norms (an update takes about 10 % longer)
    sync_every: int = 20  # vector steps per round of acting and learning side by side (docs/rounds.md)
    max_env_workers: Optional[int] = None  # most env worker processes; unset: max(32, 4 x CPUs)
    plan_precision: Literal["float32", "bfloat16"] = "float32"  # acting's product inputs (bfloat16: GPU tensor cores)


# Named configs, chosen by an optional first word: `python spowl.py small --env-id ...`; the first is the default.
PRESETS = {"paper": ("the paper's sizes (the defaults above)", Args()),
           "small": ("sizes a 2-core CPU can train", Args(num_envs=2, eval_episodes=2, batch_size=64, latent_dim=64,
                                                          mlp_dim=128, enc_dim=64, num_samples=64, num_pi_trajs=8,
                                                          num_elites=16))}

POSITIVE = ("num_envs action_repeat buffer_size utd_ratio batch_size latent_dim mlp_dim enc_dim num_enc_layers "
            "simnorm_dim num_q num_cost_heads num_bins horizon iterations num_samples num_pi_trajs num_elites "
            "q_subsample cost_subsample ci_resamples lr enc_lr_scale grad_clip_norm policy_adam_eps temperature "
            "min_std penalty_init penalty_max").split()
NON_NEGATIVE = ("learning_starts lagrange_init penalty_growth entropy_coef cost_limit cost_imb_weight consistency_coef "
                "reward_coef value_coef cost_coef cost_value_coef multiplier_lr episode_cost_limit").split()
RATES = ["gamma", "cost_gamma", "rho", "tau", "cost_tau", "scale_tau"]


def check(args):
    """The algorithm's constraints on the flags (driver.py checks the run's settings): a ValueError names the flag.
    Returns the config with --act resolved: plan only under an elite rule without cost, so that `--planner tdmpc2`
    alone is the unsafe baseline (Sec. 5.4), else the switch."""
    flag = driver.flag
    elite_rule(args)
    for names, valid, rule in [(POSITIVE, lambda x: x > 0, "must be positive"),
                               (NON_NEGATIVE, lambda x: x >= 0, "must not be negative"),
                               (RATES, lambda x: 0 < x <= 1, "must be in (0, 1]"),
                               (["dropout", "cost_dropout"], lambda x: 0 <= x < 1, "must be in [0, 1)")]:
        for name in names:  # an unset optional flag (None) passes
            if getattr(args, name) is not None and not valid(getattr(args, name)):
                raise ValueError(f"{flag(name)} {rule}, got {getattr(args, name)}")
    for small, large in [("num_elites", "num_samples"), ("q_subsample", "num_q"), ("cost_subsample", "num_cost_heads"),
                         ("min_std", "max_std"), ("log_std_min", "log_std_max"), ("vmin", "vmax"),
                         ("lagrange_init", "lagrange_max"), ("penalty_init", "penalty_max")]:
        if getattr(args, small) > getattr(args, large):
            raise ValueError(f"{flag(small)} ({getattr(args, small)}) must not exceed {flag(large)} "
                             f"({getattr(args, large)})")
    if args.num_pi_trajs >= args.num_samples:
        raise ValueError(f"--num-pi-trajs ({args.num_pi_trajs}) must be below --num-samples ({args.num_samples})")
    if args.latent_dim % args.simnorm_dim:
        raise ValueError(f"--latent-dim ({args.latent_dim}) must be a multiple of --simnorm-dim ({args.simnorm_dim})")
    if (args.num_envs * args.utd_ratio) % 1:
        raise ValueError(f"--num-envs x --utd-ratio ({args.num_envs} x {args.utd_ratio}) must be a whole number")
    if args.buffer_size // args.num_envs <= args.horizon + 1:
        raise ValueError(f"--buffer-size ({args.buffer_size}) must hold more than horizon+1 steps per env")
    if args.ci_thresholds and args.switch_rule == "mean":
        raise ValueError("--ci-thresholds needs the bootstrap interval of --switch-rule ci")
    return args if args.act else dataclasses.replace(args, act="switch" if uses_cost(args) else "plan")


# ---------------------------------------------------------------------------------------------------------------------
# Agent: parameters, optimiser states and the Lagrangian, updated together (the authors' `make_step` in
# `spowl/spowl/update.py`; optimisers as their `make_world_model`)


class Agent(NamedTuple):
    model: eqx.Module  # world model: encoder, dynamics, reward, cost, Q and cost-value heads
    target: tuple  # EMA copies of the Q and cost-value ensembles
    policy: eqx.Module
    model_opt: optax.OptState
    policy_opt: optax.OptState
    lagrangian: Lagrangian  # lambda and mu of Eq. 10 (policy.py)
    scale: jax.Array  # running Q scale S of the policy loss


def optimisers(args, model):
    """Adam for the world model (encoder at enc-lr-scale x lr) and for the policy, each after a global-norm clip.
    `optax.flatten` runs each on one flat vector: the same arithmetic, a third less compile time."""
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
    return Agent(model=model, target=targets(model), policy=policy, model_opt=model_opt.init(model),
                 policy_opt=policy_opt.init(policy), lagrangian=init_lagrangian(args), scale=jnp.ones((), jnp.float32))


def update(agent, batch, key, args, episode_cost=None):
    """One SPOWL gradient update: world model (Eq. 5-6), safe policy (Eq. 7-9), Lagrangian (Eq. 10), targets.
    `episode_cost` drives lambda under --episode-cost-limit.  Returns the agent and its logged losses."""
    key_next, key_target, key_model, key_policy = jax.random.split(key, 4)
    model_opt, policy_opt = optimisers(args, agent.model)

    # WORLD MODEL: TD targets from the next observations and the policy's actions there, then a gradient step
    z_next = encode(agent.model, batch.obs[1:])
    action_next, _ = sample_action(agent.policy, z_next, key_next, args)
    q_target, cost_value_target = td_targets(agent.target, z_next, action_next, batch.reward, batch.cost,
                                             batch.terminated, key_target, args)
    (model_loss, (terms, latents)), grads = eqx.filter_value_and_grad(world_model_loss, has_aux=True)(
        agent.model, batch, z_next, q_target, cost_value_target, key_model, args)
    updates, model_opt_state = model_opt.update(grads, agent.model_opt, agent.model)
    model = eqx.apply_updates(agent.model, updates)

    # SAFE POLICY on the rolled-out latents and the updated heads; an elite rule without cost (TD-MPC2) leaves out Psi
    safe = uses_cost(args)

    def loss(policy):
        return policy_loss(policy, model, latents, agent.lagrangian, agent.scale, key_policy, args, safe)

    (pi_loss, pi_info), grads = eqx.filter_value_and_grad(loss, has_aux=True)(agent.policy)
    updates, policy_opt_state = policy_opt.update(grads, agent.policy_opt, agent.policy)
    policy = eqx.apply_updates(agent.policy, updates)

    # LAGRANGIAN and TARGETS
    lagrangian = update_lagrangian(agent.lagrangian, pi_info["delta"], args, episode_cost) if safe else agent.lagrangian
    target = update_targets(agent.target, model, args)
    info = {"model_loss": model_loss, **terms, "policy_loss": pi_loss, **pi_info, "q_target": q_target.mean(),
            "cost_value_target": cost_value_target.mean()}
    if args.diagnostics:
        info.update(policy_grad_norms(loss, agent.policy, grads))
    return Agent(model, target, policy, model_opt_state, policy_opt_state, lagrangian, pi_info["scale"]), info


# ---------------------------------------------------------------------------------------------------------------------
# A run, in rounds of `sync-every` vector steps: in round k an actor collects a rollout with the agent as it is at
# the round's start, while a learner stores round k-1's rollout and makes its updates (why: docs/rounds.md).


class Actor(NamedTuple):  # what acting carries from one vector step to the next; each field (N, ...)
    env_state: tuple
    obs: jax.Array  # (N, E, O)
    ended: jax.Array  # (N, E) obs is the last of its episode: the next action only triggers the reset
    plan_mean: jax.Array  # (N, E, H, A) warm start of the planner
    episode_return: jax.Array  # (N, E)
    episode_cost: jax.Array  # (N, E)
    global_step: jax.Array  # (N,) raw training env steps, summed over envs; equal over seeds
    total_cost: jax.Array  # (N,) cumulative training cost
    key: jax.Array  # (N, 2)


class Rollout(NamedTuple):  # a round's acting, K vector steps
    transitions: tuple  # (obs, action, reward, cost, terminated, truncated), each (K, N, E, ...)
    active: jax.Array  # (K,) the step was played (before the run's end)
    learning: jax.Array  # (K,) the step was past the random phase
    global_step: jax.Array  # (K,) after the step


class Runner(NamedTuple):  # a run between two rounds
    agent: Agent
    buffer: replay.Buffer
    actor: Actor
    key: jax.Array  # (N, 2) the learner's
    last_rollout: Rollout  # the one the next round's learner stores and learns from


class Train(NamedTuple):
    init: callable  # keys (N, 2) -> Runner, with an empty last rollout
    collect: callable  # (Actor, Agent, stop_at) -> (Actor, Rollout, metrics): a round of acting
    learn: callable  # (Agent, Buffer, key, Rollout) -> (Agent, Buffer, key, metrics): store a rollout, update
    evaluate: callable  # (agents, keys (N, 2)) -> (returns, costs), each (N, eval_episodes)
    run: callable  # keys (N, 2) -> (Runner, (returns, costs)): a whole run on a pure-JAX env
    eval_act: callable  # planner.act in eval mode for one agent: (model, policy, obs, plan_mean, key)


def idle_branch(fn):
    """The other branch of lax.cond(busy, fn, idle_branch(fn), state, ...): state unchanged, the other outputs zeros
    (shaped by `eval_shape`, whose trace of a jitted fn the busy branch's call reuses)."""

    def idle(state, *rest):
        return (state, *jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, state, *rest)[1:]))

    return idle


def make_train(args, env, eval_env):
    """Pure functions of a SPOWL run over N seeds (PureJaxRL-style); `env` / `eval_env` are batched `Env`s (envs.py).
    Each seed's work is vmapped, except the env step.  Seeds step in lockstep, so the masks (random phase, run end)
    come from seed 0 and stay real branches of `lax.cond`."""
    num_envs, horizon, round_length = args.num_envs, args.horizon, args.sync_every

    def init(keys):
        key_agent, key_env, key_actor, key = split_keys(keys, 4)
        agent = jax.vmap(lambda k: init_agent(k, args, env.obs_dim, env.action_dim))(key_agent)
        env_state, obs = env.reset(key_env)

        def new_buffer(obs):  # one seed's, holding the first observations
            buffer = replay.init(num_envs, args.buffer_size // num_envs, env.obs_dim, env.action_dim)
            zeros = jnp.zeros(num_envs)
            return replay.add(buffer, obs, jnp.zeros((num_envs, env.action_dim)), zeros, zeros, zeros > 0, zeros > 0)

        zeros = jnp.zeros(obs.shape[:2])
        actor = Actor(env_state, obs, zeros > 0, jnp.zeros((*obs.shape[:2], horizon, env.action_dim)), zeros, zeros,
                      jnp.zeros(obs.shape[0], jnp.int32), jnp.zeros(obs.shape[0]), key_actor)
        empty_rollout = idle_branch(collect)(actor, agent, 0)[1]
        return Runner(agent, jax.vmap(new_buffer)(obs), actor, key, empty_rollout)

    # COLLECT: plan (Alg. 2) once learning, uniform random actions before
    plan = jax.jit(lambda agent, obs, plan_mean, key: act(agent.model, agent.policy, obs, plan_mean, key, args))

    def choose_action(agent, actor, key, learning):  # one seed
        def random(agent, obs, plan_mean, key):
            action = jax.random.uniform(key, (num_envs, env.action_dim), minval=-1, maxval=1)
            return action, plan_mean, idle_branch(plan)(agent, obs, plan_mean, key)[2]  # no planner diagnostics

        return jax.lax.cond(learning, plan, random, agent, actor.obs, actor.plan_mean, key)

    def env_step(actor, agent, learning):  # one vector step of every seed: -> actor, transition, metrics
        key, key_act, key_env = split_keys(actor.key, 3)
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
                   "global_step": global_step, **jax.tree.map(lambda x: x.mean(-1), act_info)}  # mean over envs
        return actor, transition, metrics

    step = jax.jit(env_step)

    def collect(actor, agent, stop_at):
        """A round: `sync-every` vector steps with the agent fixed, skipping those from global step `stop_at` on."""

        def masked_step(actor, _):
            active = actor.global_step[0] < stop_at
            learning = actor.global_step[0] >= args.learning_starts
            actor, transition, metrics = jax.lax.cond(active, step, idle_branch(step), actor, agent, learning)
            return actor, (transition, active, learning, metrics)

        actor, (transitions, active, learning, metrics) = jax.lax.scan(masked_step, actor, None, length=round_length)
        shape = metrics["global_step"].shape  # (K, N)
        masks = {"active": jnp.broadcast_to(active[:, None], shape),
                 "learning": jnp.broadcast_to(learning[:, None], shape)}
        return actor, Rollout(transitions, active, learning, metrics["global_step"][:, 0]), {**metrics, **masks}

    # STORE
    def store(buffer, rollout):
        def add_step(buffer, inputs):
            transition, active = inputs
            return jax.lax.cond(active, jax.vmap(replay.add), lambda b, *_: b, buffer, *transition), None

        return jax.lax.scan(add_step, buffer, (rollout.transitions, rollout.active))[0]

    # UPDATE: num-envs x utd-ratio gradient updates per learning step of the rollout
    def gradient_updates(agent, buffer, key, episode_cost):  # one seed
        def one_update(agent, key):
            key_sample, key_update = jax.random.split(key)
            batch = replay.sample(buffer, key_sample, args.batch_size, horizon)
            return update(agent, batch, key_update, args, episode_cost)

        agent, info = jax.lax.scan(one_update, agent, jax.random.split(key, round(num_envs * args.utd_ratio)))
        return agent, jax.tree.map(jnp.mean, info)

    updates = jax.jit(jax.vmap(gradient_updates))

    def update_round(agent, buffer, key, rollout):
        """The updates for a stored rollout's learning steps; metrics (K, N), zeros where `updated` is False."""
        episode_cost = cost_per_episode(rollout.transitions[3], rollout.active, env.episode_steps)

        def learn_step(agent, inputs):
            keys, needs_update = inputs
            needs_update = needs_update & (buffer.size[0] > horizon)  # a window of horizon+1 entries must fit
            agent, info = jax.lax.cond(needs_update, updates, idle_branch(updates), agent, buffer, keys, episode_cost)
            norm = lambda a: optax.tree.norm(eqx.filter((a.model, a.policy), eqx.is_inexact_array))  # noqa: E731
            metrics = {**agent.lagrangian._asdict(), "param_norm": jax.vmap(norm)(agent),
                       "updated": jnp.broadcast_to(needs_update, agent.scale.shape), **info}
            return agent, metrics

        keys = split_keys(key, round_length)  # (K, N, 2)
        return jax.lax.scan(learn_step, agent, (keys, rollout.active & rollout.learning))

    def cost_value_check(agent, buffer, key):  # one seed: the heads against the buffer's Monte-Carlo cost returns
        key_rest, key_action = jax.random.split(key)
        rest = replay.episode_rests(buffer, key_rest, args.batch_size, env.episode_steps, args.cost_gamma)
        last = encode(agent.model, rest.last_obs)
        last_action, _ = sample_action(agent.policy, last, key_action, args)
        return world_model.cost_value_check(agent.model, rest, last, last_action, args)

    def learn(agent, buffer, key, rollout):
        """Store a rollout, make its updates, check the cost values; per-step metrics (K, N)."""
        buffer = store(buffer, rollout)
        # The check's key is a third split: the first two are those of a split in two, so the updates do not depend
        # on it.
        key, key_updates, key_check = split_keys(key, 3)
        agent, metrics = update_round(agent, buffer, key_updates, rollout)
        checked = jax.vmap(cost_value_check)(agent, buffer, key_check)  # once a round: ~0.1 % of its updates' time
        shape = metrics["updated"].shape
        masks = {"active": jnp.broadcast_to(rollout.active[:, None], shape),
                 "global_step": jnp.broadcast_to(rollout.global_step[:, None], shape)}
        return agent, buffer, key, {**metrics, **jax.tree.map(lambda x: jnp.broadcast_to(x, shape), checked), **masks}

    # EVALUATE: full episodes in eval mode
    eval_act = functools.partial(act, args=args, eval_mode=True)
    seeds_act = jax.vmap(lambda agent, *inputs: eval_act(agent.model, agent.policy, *inputs))

    def evaluate(agent, keys):
        return envs.run_episodes(eval_env, seeds_act, agent, keys, args.eval_episodes, horizon)

    def run(keys):
        """A whole run as one pure function: the driver's rounds up to `total-timesteps`, one more round for the last
        rollout's updates, then an evaluation."""

        def one_round(runner):
            actor, rollout, _ = collect(runner.actor, runner.agent, args.total_timesteps)
            agent, buffer, key, _ = learn(runner.agent, runner.buffer, runner.key, runner.last_rollout)
            return Runner(agent, buffer, actor, key, rollout)

        running = lambda runner: runner.actor.global_step[0] < args.total_timesteps  # noqa: E731
        runner = one_round(jax.lax.while_loop(running, one_round, init(keys)))
        eval_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, args.total_timesteps)
        return runner, evaluate(runner.agent, eval_keys)

    return Train(init, collect, learn, evaluate, run, eval_act)


if __name__ == "__main__":
    driver.main(PRESETS, check, make_train)
