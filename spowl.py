"""SPOWL -- Safe Planning and Policy Optimization via World Model Learning -- in JAX: config, agent, training.

    python spowl.py --env-id SafetyPointGoal1-v0

A TD-MPC2-style implicit world model with cost heads (world_model.py), a safe policy trained with an Augmented
Lagrangian (policy.py), a safe improvement planner with a plan/policy switch (planner.py) and a replay buffer
(buffer.py).  This file holds the algorithm, top-down: the config (`Args`), the agent and its gradient update, and
`make_train`, the pure functions of a run.  The run machinery -- compiling, threads, logging, evaluation schedule,
checkpoints, signals -- lives in driver.py, which `main` hands the run to.
"""

import dataclasses
from dataclasses import dataclass
from typing import Literal, NamedTuple, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import buffer as replay
import driver
from planner import act, uses_cost
from policy import init_policy, policy_loss, sample_action, update_multipliers
from world_model import encode, head_values, init_world_model, targets, td_targets, world_model_loss



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
    """raw env steps between log rows, written at the first round boundary past each multiple (training depends on
    none of the three intervals)"""
    eval_every: int = 50_000
    """raw env steps between evaluations (each runs beside the training after it)"""
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
    diagnostics: bool = False
    """also log the policy-gradient norms of the reward part, Psi and Delta (an update takes about 10 % longer)"""
    sync_every: int = 20
    """vector steps per round: the actor plays round k with the agent that has learned from the rounds up to k-2,
    while the learner stores round k-1 and makes its updates"""
    max_env_workers: Optional[int] = None
    """most Safety-Gymnasium worker processes, num-seeds x (num-envs + eval envs), a run may start; default
    max(32, 4 x CPU count)"""
    plan_precision: Literal["float32", "bfloat16"] = "float32"
    """inputs of the networks' matrix products when acting (planning, switch, evaluation), accumulated in float32:
    bfloat16 runs them on GPU tensor cores, where a paper-size planning call is bound by float32 arithmetic
    (docs/elementwise.md); gradient updates and all parameters stay float32"""

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
    cost_tau: Optional[float] = None
    """not the paper's: EMA rate of the cost-value target ensemble alone (unset: --tau).  A value TD-learnt at rate
    tau and discount gamma_c converges over about 1 / (tau (1 - gamma_c)) updates; a faster cost target lets the
    cost-value heads catch up with the real cost in a short run (docs/safety.md)"""
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
    episode_cost_limit: Optional[float] = None
    """not the paper's: a limit on the measured cost of a full training episode (Safety-Gymnasium's usual one is 25).
    Set, it replaces Eq. 10's multiplier step with lambda <- clip(lambda + multiplier-lr x (C - limit), 0,
    lagrange-max) after every update, C the cost per episode the training envs ran at in the round being learned
    (docs/safety.md); mu keeps its schedule.  Left out: the paper's multiplier step on the predicted Delta"""
    multiplier_lr: float = 2e-6
    """step size of lambda per update per unit of episode cost over the limit (with --episode-cost-limit)"""

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
    for element, with the global norm summed in another order, in a few large operations instead of a few per
    parameter array, which cuts an update's compile time by a third."""
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
                 policy_opt=policy_opt.init(policy), multiplier=jnp.asarray(args.lagrange_init, jnp.float32),
                 penalty=jnp.asarray(args.penalty_init, jnp.float32), scale=jnp.ones((), jnp.float32))


def update(agent, batch, key, args, episode_cost=None):
    """One SPOWL gradient update: world model (Eq. 5-6), then safe policy (Eq. 7-10), then target EMA.

    `episode_cost`: the measured cost per training episode that drives the multiplier under --episode-cost-limit.

    Returns the new agent and a dict of the named loss terms and diagnostics (every one of them is logged).
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
    # The policy sees the rolled-out latents and the *updated* value heads; under an elite rule without costs
    # (TD-MPC2) it is the plain max-entropy policy and the multipliers stay as they are.
    safe = uses_cost(args)

    def loss(policy):
        return policy_loss(policy, model, latents, agent.multiplier, agent.penalty, agent.scale, key_policy, args, safe)

    (pi_loss, pi_info), grads = eqx.filter_value_and_grad(loss, has_aux=True)(agent.policy)
    updates, policy_state = policy_opt.update(grads, agent.policy_opt, agent.policy)
    policy = eqx.apply_updates(agent.policy, updates)
    multiplier, penalty = agent.multiplier, agent.penalty
    if safe:
        multiplier, penalty = update_multipliers(multiplier, penalty, pi_info["delta"], args, episode_cost)
    target = update_targets(agent.target, model, args)
    info = {"model_loss": model_loss, **terms, "policy_loss": pi_loss, **pi_info, "q_target": q_target.mean(),
            "cost_value_target": cost_value_target.mean()}
    if args.diagnostics:
        info.update(policy_grad_norms(loss, agent.policy, grads))
    return agent._replace(model=model, target=target, policy=policy, model_opt=model_state, policy_opt=policy_state,
                          multiplier=multiplier, penalty=penalty, scale=pi_info["scale"]), info


def policy_grad_norms(loss, policy, grads):
    """How hard each part of the policy loss pulls (a diagnostic, --diagnostics): the gradient norms of the reward part,
    of Psi (the rest of the loss, from the applied `grads`) and of Delta itself; the multiplier at which Psi would
    pull as hard as the reward part is the reward part's norm over Delta's."""
    part_grad = lambda part: eqx.filter_grad(lambda p: loss(p)[1][part])(policy)  # noqa: E731
    reward_grads, delta_grads = part_grad("reward_loss"), part_grad("delta")
    norm = optax.tree.norm
    return {"reward_grad_norm": norm(reward_grads), "delta_grad_norm": norm(delta_grads),
            "psi_grad_norm": norm(jax.tree.map(jnp.subtract, grads, reward_grads))}


def update_targets(target, model, args):
    """The target ensembles' EMA: Q-bar <- Q-bar + tau (Q - Q-bar), and Q^c-bar likewise at --cost-tau (unset: tau)."""
    cost_tau = args.tau if args.cost_tau is None else args.cost_tau
    return tuple(jax.tree.map(lambda t, o: t + rate * (o - t), old, new)
                 for rate, old, new in zip((args.tau, cost_tau), target, targets(model)))


def cost_value_check(agent, buffer, key, args, episode_steps):
    """The cost-value heads against Monte-Carlo cost returns from the buffer (a diagnostic, logged once a round).

    At random stored states s_t with their actions a_t: the heads' prediction Q^c(s_t, a_t) (mean of all heads, no
    dropout); the discounted cost of the rest of the episode as it happened; and the prediction of that same finite
    sum, Q^c(s_t, a_t) - gamma_c^n Q^c(s_T, pi(s_T)), the heads' own value n steps later at the episode's last state
    taken off (truncated episodes bootstrap, so the heads predict beyond them)."""
    key_rest, key_action = jax.random.split(key)
    rest = replay.episode_rests(buffer, key_rest, args.batch_size, episode_steps, args.cost_gamma)
    model, last = agent.model, encode(agent.model, rest.last_obs)
    predicted = head_values(model.cost_value, encode(model, rest.obs), rest.action, args).mean(0)
    after = head_values(model.cost_value, last, sample_action(agent.policy, last, key_action, args)[0], args).mean(0)
    episode_part = predicted - args.cost_gamma**rest.steps * jnp.where(rest.terminated, 0.0, after)
    counted = rest.steps > 0  # a start that is its episode's last state has no rest
    mean = lambda x: (x * counted).sum() / jnp.maximum(counted.sum(), 1)  # noqa: E731
    return {"cost_value_pred": mean(predicted), "cost_value_pred_episode": mean(episode_part),
            "cost_return_mc": mean(rest.cost_return)}


# ---------------------------------------------------------------------------------------------------------------------
# A run, in rounds of `sync-every` vector steps.  In round k an actor plans and steps the envs with the agent as it is
# at the round's start, while a learner stores round k-1's transitions in the replay buffer and makes the gradient
# updates owed for its steps; each is a `lax.scan`.  The two are independent, so the driver runs them side by side on
# two threads (the XLA CPU runtime runs one program's independent work one after another), and env steps overlap
# gradient updates.  The agent acts with parameters one to two rounds old, as the authors' code acts with parameters
# up to 100 vector steps old (it updates in blocks).  The schedule depends on the round number alone, never on when
# the driver logs, evaluates or checkpoints.


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


class Round(NamedTuple):
    """One round's acting, as the learner takes it: transitions (obs, action, reward, cost, terminated, truncated),
    each (K, N, E, ...), the per-step `active` and `learning` gates and the global step after each step (K,)."""

    transitions: tuple
    active: jax.Array
    learning: jax.Array
    global_step: jax.Array


class Runner(NamedTuple):
    """A whole run between two rounds: agent, replay buffer, actor, the learner's key, and the last round's acting,
    whose storing and updates the next round's learner makes (`pending`)."""

    agent: Agent
    buffer: replay.Buffer
    actor: Actor
    key: jax.Array  # (N, 2) the learner's
    pending: Round


class Train(NamedTuple):
    init: callable  # keys (N, 2) -> Runner, with nothing pending
    act: callable  # (Actor, Agent, stop_at) -> (Actor, Round, metrics): a round of acting; agent and buffer untouched
    learn: callable  # (Agent, Buffer, key, Round) -> (Agent, Buffer, key, metrics): store a round, make its updates
    evaluate: callable  # (agents, keys (N, 2)) -> (returns, costs), each (N, eval_episodes), of full eval episodes
    run: callable  # keys (N, 2) -> (Runner, (returns, costs)): a whole run, for a pure-JAX env


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


def cost_per_episode(acted, episode_steps):
    """The cost per full episode that a round's training envs ran at, each seed's: (N,).  (Episode resets, cost-free
    steps, take a step in `episode_steps + 1` off the measure.)"""
    cost, active = acted.transitions[3], acted.active[:, None, None]  # (K, N, E), (K, 1, 1)
    return (cost * active).sum((0, 2)) / jnp.maximum(active.sum() * cost.shape[2], 1) * episode_steps


def make_train(args, env, eval_env):
    """Pure functions of a SPOWL run over N seeds (PureJaxRL-style); `env` / `eval_env` are batched `Env`s (envs.py).

    Each seed is an independent run: its work is `vmap`ped, and only the env step -- one call for all seeds, a single
    host callback on Safety-Gymnasium -- sits outside.  Seeds step in lockstep, so the gates (random phase, run end)
    come from seed 0 and stay real branches: under a vmapped `lax.cond` with per-seed predicates both would run.
    """
    num_envs, horizon, round_length = args.num_envs, args.horizon, args.sync_every

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
        """`sync-every` vector steps with the agent fixed; steps from global step `stop_at` on are skipped (episode
        resets add 0 raw steps, so a run's last round may be needed to get there)."""

        def gated_step(actor, _):
            active = actor.global_step[0] < stop_at
            learning = actor.global_step[0] >= args.learning_starts
            actor, transition, metrics = jax.lax.cond(active, step, skipped(step), actor, agent, learning)
            return actor, (transition, active, learning, metrics)

        actor, (transitions, active, learning, metrics) = jax.lax.scan(gated_step, actor, None, length=round_length)
        shape = metrics["global_step"].shape  # (K, N)
        gates = {"active": jnp.broadcast_to(active[:, None], shape),
                 "learning": jnp.broadcast_to(learning[:, None], shape)}
        return actor, Round(transitions, active, learning, metrics["global_step"][:, 0]), {**metrics, **gates}

    def gradient_updates(agent, buffer, key, episode_cost):  # one seed: num-envs x utd-ratio updates (Eq. 5-10)
        def one_update(agent, key):
            key_sample, key_update = jax.random.split(key)
            batch = replay.sample(buffer, key_sample, args.batch_size, horizon)
            return update(agent, batch, key_update, args, episode_cost)

        agent, info = jax.lax.scan(one_update, agent, jax.random.split(key, round(num_envs * args.utd_ratio)))
        return agent, jax.tree.map(jnp.mean, info)

    updates = jax.jit(jax.vmap(gradient_updates))

    def learn(agent, buffer, key, acted):
        """Store a round's transitions, then make the updates owed for its learning steps, one vector step's worth
        (num-envs x utd-ratio) per step, on the buffer that holds them all.  Returns the agent, buffer, next key and
        per-step metrics (K, N), `updated` marking the steps whose updates were made (`update`'s outputs are zeros
        on the others)."""

        def store(buffer, inputs):
            transition, active = inputs
            return jax.lax.cond(active, jax.vmap(replay.add), lambda b, *_: b, buffer, *transition), None

        buffer, _ = jax.lax.scan(store, buffer, (acted.transitions, acted.active))
        episode_cost = cost_per_episode(acted, env.episode_steps)  # for --episode-cost-limit
        # The check's key is a third split: the first two are those of split(key, 2) (JAX's default threefry RNG), so
        # the learner's keys do not depend on it.
        key, key_updates, key_check = split(key, 3)

        def learn_step(agent, inputs):
            keys, owed = inputs
            owed = owed & (buffer.size[0] > horizon)  # a window of horizon+1 entries must fit
            agent, info = jax.lax.cond(owed, updates, skipped(updates), agent, buffer, keys, episode_cost)
            norm = lambda a: optax.tree.norm(eqx.filter((a.model, a.policy), eqx.is_inexact_array))  # noqa: E731
            metrics = {"multiplier": agent.multiplier, "penalty": agent.penalty, "param_norm": jax.vmap(norm)(agent),
                       "updated": jnp.broadcast_to(owed, agent.multiplier.shape), **info}
            return agent, metrics

        keys = jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, round_length))(key_updates), 0, 1)  # (K, N, 2)
        agent, metrics = jax.lax.scan(learn_step, agent, (keys, acted.active & acted.learning))
        shape = metrics["updated"].shape  # (K, N)
        # The cost-value check, once a round: about 0.1 % of the time of the round's updates at $SMALL on a CPU.
        check = jax.vmap(cost_value_check, in_axes=(0, 0, 0, None, None))(agent, buffer, key_check, args,
                                                                            env.episode_steps)
        gates = {"active": jnp.broadcast_to(acted.active[:, None], shape),
                 "global_step": jnp.broadcast_to(acted.global_step[:, None], shape)}
        return agent, buffer, key, {**metrics, **jax.tree.map(lambda x: jnp.broadcast_to(x, shape), check), **gates}

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
        nothing = zeros_like_output(act_round, actor, agent, 0)[1]  # an empty round
        return Runner(agent, jax.vmap(new_buffer)(obs), actor, key, nothing)

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

    def run(keys):
        """A whole run as one pure function of the seeds' keys, PureJaxRL-style: `jax.jit(train.run)(keys)` trains N
        seeds in one XLA program on a pure-JAX env.  The driver's rounds, one after the other, in a `lax.while_loop`
        up to `total-timesteps`, and one more in which the actor has no step left (the last round's updates); then an
        evaluation.  Returns the runner and the eval returns and costs (N, eval_episodes)."""

        def one_round(runner):
            actor, acted, _ = act_round(runner.actor, runner.agent, args.total_timesteps)
            agent, buffer, key, _ = learn(runner.agent, runner.buffer, runner.key, runner.pending)
            return Runner(agent, buffer, actor, key, acted)

        running = lambda runner: runner.actor.global_step[0] < args.total_timesteps  # noqa: E731
        runner = one_round(jax.lax.while_loop(running, one_round, init(keys)))
        eval_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, args.total_timesteps)
        return runner, evaluate(runner.agent, eval_keys)

    return Train(init, act_round, learn, evaluate, run)


def main():
    """The command line: check the flags, then hand the run to the driver."""
    driver.main(Args, make_train)


if __name__ == "__main__":
    main()
