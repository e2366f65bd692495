"""The env layer: Safety-Gymnasium behind a batched, fixed-shape interface that `jit` can step, and the same interface
over the pure-JAX test-bed.

    env = make_envs(args)[0]
    env_state, obs = env.reset(key)
    env_state, obs, reward, cost, terminated, truncated, raw_steps = env.step(env_state, action, key)

Safety-Gymnasium tasks run in worker processes (`make_vector_env`) and are stepped from inside `jit` by an ordered
host callback (`host_env`); pure-JAX tasks (jax_env.py) are stepped inside the scan itself (`pure_env`).
"""

import contextlib
import functools
import logging
import multiprocessing.connection
import signal
import types
from typing import NamedTuple
from unittest import mock

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import xmltodict
from gymnasium.vector.async_vector_env import AsyncState
from jax.experimental import io_callback
from jax.sharding import NamedSharding, PartitionSpec

import jax_env
import sg_fixes

sg_fixes.install()  # Safety-Gymnasium 1.0.0 on Python >= 3.11 and numpy 2: fixed as it loads (sg_fixes.py)

JAX_ENVS = {jax_env.ENV_ID: jax_env}  # the project's pure-JAX tasks, by env id

# ---------------------------------------------------------------------------------------------------------------------
# Safety-Gymnasium behind a fixed-shape, next-step auto-resetting vector API (the authors' `ActionRepeat` and
# `Autoreset` in `spowl/common/wrappers.py`)

# Safety-Gymnasium is imported where it is used, so that the pure-JAX tasks run without it.


def check_env_id(env_id: str) -> None:
    """Rejects anything but a single-agent, vector-observation Safety-Gymnasium task, before any env is built."""
    from safety_gymnasium.utils.registration import safe_registry

    # `safe_registry` holds every id registered through `safety_gymnasium.register`: the single-agent tasks and their
    # `...Vision-v0` (pixel observations) and `...Debug-v0` (keyboard-driven) variants. Multi-agent tasks are built by
    # `safety_gymnasium.make_ma` and are not in it, nor are the `...Gymnasium-v0` aliases in Gymnasium's registry.
    config = gymnasium.envs.registry[env_id].kwargs.get("config", {}) if env_id in safe_registry else None
    if config is None or config.get("observe_vision") or config.get("debug"):
        raise ValueError(
            f"--env-id {env_id!r} is not a single-agent Safety-Gymnasium task with vector observations "
            "(e.g. SafetyPointGoal1-v0; Vision, Debug and multi-agent tasks are not supported)"
        )


def _unparse_without_skybox(tree, **kwargs):
    """`xmltodict.unparse` as `World.build` sees it in a cheap reset: drops the skybox texture from the world XML."""
    asset = tree["mujoco"]["asset"]
    asset["texture"] = [texture for texture in asset["texture"] if texture.get("@type") != "skybox"]
    return xmltodict.unparse(tree, **kwargs)


@contextlib.contextmanager
def _without_skybox():
    """Within this context, Safety-Gymnasium compiles its MuJoCo models without the skybox texture.

    Every reset rebuilds the model from XML, and decoding the six HD skybox images is nearly all of that time. The
    skybox is only ever drawn, never simulated or sensed, so observations, rewards and costs stay bit-identical.
    `World.build` is the only place a model is compiled, from the string `xmltodict.unparse` makes of its XML tree,
    so swapping that one name in `safety_gymnasium.world` for the duration of a reset is enough.
    """
    import safety_gymnasium.world

    xmltodict_without_skybox = types.SimpleNamespace(parse=xmltodict.parse, unparse=_unparse_without_skybox)
    with mock.patch.object(safety_gymnasium.world, "xmltodict", xmltodict_without_skybox):
        yield


class SpowlEnv(gymnasium.Wrapper):
    """Clipped actions, action repeat, float32 observations and next-step auto-reset (as the authors' wrappers).

    One `step` repeats the action for up to `action_repeat` raw steps, summing reward and cost and stopping early at
    an episode end. The wrapper never reports `terminated`/`truncated` itself, so Gymnasium 0.28's vector envs, which
    reset on the *same* step and hide the final observation in `info`, never reset on their own. The true flags and the
    raw steps taken travel in `info`; the step after an episode ended ignores its action and returns the reset
    observation with reward 0, cost 0, no flags and 0 raw steps (the next-step semantics of Gymnasium >= 1.0).
    """

    def __init__(self, env: gymnasium.Env, action_repeat: int, seed: int, cheap_reset: bool):
        super().__init__(env)
        self.action_repeat, self.cheap_reset = action_repeat, cheap_reset
        self._seed = seed  # used by the first reset only; later episodes continue the env's own random stream
        self._episode_over = False
        space = env.observation_space
        self.observation_space = gymnasium.spaces.Box(space.low, space.high, space.shape, np.float32)

    def reset(self, *, seed=None, options=None):
        seed, self._seed = (self._seed if seed is None else seed), None
        self._episode_over = False
        with _without_skybox() if self.cheap_reset else contextlib.nullcontext():
            obs, info = self.env.reset(seed=seed, options=options)
        return obs.astype(np.float32), info

    def step(self, action):
        if self._episode_over:
            obs, _ = self.reset()
            return obs, 0.0, False, False, {"cost": 0.0, "terminated": False, "truncated": False, "raw_steps": 0}
        action = np.clip(action, -1.0, 1.0)
        reward = cost = 0.0
        for raw_steps in range(1, self.action_repeat + 1):
            obs, raw_reward, terminated, truncated, info = self.env.step(action)
            reward, cost = reward + float(raw_reward), cost + float(info["cost"])
            if terminated or truncated:
                break
        self._episode_over = bool(terminated or truncated)
        # Plain Python scalars, so the vector env batches each info key into an array of that dtype.
        info = {"cost": cost, "terminated": bool(terminated), "truncated": bool(truncated), "raw_steps": raw_steps}
        return obs.astype(np.float32), reward, False, False, info


def make_env(env_id: str, action_repeat: int, seed: int, render: bool = False) -> gymnasium.Env:
    """One Safety-Gymnasium env with the wrappers above; `render=True` keeps the skybox for `env.render()` frames."""
    import safety_gymnasium

    # `safety_gymnasium.make` already adds the registered time limit (1000 raw steps for Goal/Push/Button), beneath
    # the action repeat, so it counts raw steps.
    env = safety_gymnasium.make(env_id, render_mode="rgb_array" if render else None)
    env = safety_gymnasium.wrappers.SafetyGymnasium2Gymnasium(env)  # 5-tuple API, cost in info["cost"]
    env = gymnasium.wrappers.RescaleAction(env, -1.0, 1.0)
    return SpowlEnv(env, action_repeat, seed, cheap_reset=not render)


class WorkerFailed(RuntimeError):
    """An env worker process died or raised; the message names it and the cause."""


class Workers(gymnasium.vector.AsyncVectorEnv):
    """Gymnasium 0.28's `AsyncVectorEnv` whose worker processes ignore SIGINT and which, when a worker dies or raises,
    raises `WorkerFailed` naming it (and keeps the message in `failure`).

    A worker whose trainer died (kill -9, say) exits by itself: its next read or write of the pipe to the trainer
    fails, Gymnasium's worker loop ends on that error, and the process with it.
    """

    def __init__(self, env_fns, kind: str, seeds: list):
        # "spawn", not the Linux default "fork": forking a process in which JAX's threads already run can deadlock.
        # The workers re-import the main module, so a script needs its `if __name__ == "__main__":` guard.
        # Ctrl-C in a terminal signals the whole process group, and Gymnasium's workers die on KeyboardInterrupt, so
        # they start with SIGINT ignored (exec keeps an ignored signal ignored, and Python leaves it so) and the
        # trainer decides.  The trainer itself ignores SIGINT for these few seconds too.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            super().__init__(env_fns, context="spawn")
        finally:
            signal.signal(signal.SIGINT, previous)
        self.kind, self.seeds, self.failure = kind, seeds, None

    def reset(self, **kwargs):
        try:
            return super().reset(**kwargs)
        except Exception as error:
            raise self.failed(error) from None

    def step_async(self, actions):
        try:
            return super().step_async(actions)
        except Exception as error:
            raise self.failed(error) from None

    def step_wait(self, *args, **kwargs):  # Gymnasium's close() passes its timeout positionally
        try:
            return super().step_wait(*args, **kwargs)
        except Exception as error:
            raise self.failed(error) from None

    def failed(self, error: Exception) -> WorkerFailed:
        """Names the worker behind `error`: one that raised (Gymnasium drops its pipe) or one whose process ended."""
        raised = [i for i, pipe in enumerate(self.parent_pipes) if pipe is None]
        sentinels = [process.sentinel for process in self.processes]
        ended = [] if raised else multiprocessing.connection.wait(sentinels, timeout=1.0)
        if raised:
            index, cause = raised[0], f"raised {type(error).__name__}: {error}"
        elif ended:
            index = sentinels.index(ended[0])
            self.processes[index].join(timeout=1.0)  # its pipe closes just before its exit code can be read
            code = self.processes[index].exitcode
            cause = ("exited (exit code unknown)" if code is None else f"exited with code {code}" if code >= 0 else
                     f"was killed by {signal.Signals(-code).name}")
        else:
            index, cause = None, f"failed: {type(error).__name__}: {error}"
        which = "an unknown" if index is None else f"{self.kind} env {index} (env seed {self.seeds[index]})"
        self.failure = f"{which} worker {cause}"
        self._state = AsyncState.DEFAULT  # nothing is pending any more: close(terminate=True) stops the rest at once
        return WorkerFailed(self.failure)


# JAX logs every exception raised in a host callback with its traceback; a failed worker is reported in one line.
logging.getLogger("jax._src.callback").addFilter(
    lambda record: not (record.exc_info and isinstance(record.exc_info[1], WorkerFailed)))


def make_vector_env(env_id: str, seeds: list, action_repeat: int, kind: str = "training") -> Workers:
    """One env per seed in `seeds`, each in a worker process, seeded with it at its first reset."""
    return Workers([functools.partial(make_env, env_id, action_repeat, seed) for seed in seeds], kind, seeds)


def vector_reset(envs: gymnasium.vector.VectorEnv) -> np.ndarray:
    """Resets every env; returns obs (E, obs_dim) float32."""
    obs, _ = envs.reset()
    return obs.astype(np.float32)


def vector_step(envs: gymnasium.vector.VectorEnv, actions: np.ndarray) -> tuple:
    """One agent step in every env, with the fixed dtypes and shapes a JAX `io_callback` must declare.

    Returns obs (E, obs_dim) float32, reward (E,) float32, cost (E,) float32, terminated (E,) bool, truncated (E,)
    bool, raw_steps (E,) int32; after an episode end, an env's next step returns its reset observation (see SpowlEnv).
    """
    obs, reward, _, _, info = envs.step(np.asarray(actions))
    return (obs.astype(np.float32), reward.astype(np.float32), info["cost"].astype(np.float32),
            info["terminated"].astype(bool), info["truncated"].astype(bool), info["raw_steps"].astype(np.int32))


# ---------------------------------------------------------------------------------------------------------------------
# Environments: one pure interface for both kinds, batched over seeds (N) and the envs of each seed (E)
#   reset(keys (N, 2)) -> (env_state, obs (N, E, O))
#   step(env_state, action (N, E, A), keys (N, 2)) -> (env_state, obs, reward, cost, terminated, truncated, raw_steps)
# with *next-step* auto-reset (as the authors' `Autoreset`): after an episode's final observation (returned with its
# flag) the next action is ignored and the env returns the reset observation with reward 0, cost 0, no flags and 0 raw
# steps.


class Env(NamedTuple):
    num_seeds: int  # N: independent runs stepped together
    num_envs: int  # E: envs per seed
    obs_dim: int
    action_dim: int
    action_repeat: int  # raw env steps per agent step
    episode_steps: int  # agent steps of a full episode
    reset: callable
    step: callable


def run_episodes(env, act, agent, keys, num_episodes, horizon):
    """`num_episodes` full episodes per seed, `env.num_envs` at a time from fresh resets, each action from `act(agent,
    obs, plan_mean, key) -> (action, plan_mean, info)` over the seeds: their returns and costs, each (N, num_episodes),
    summed over whole episodes (Table 1's measure)."""

    def episode_batch(keys):
        key_reset, key = split_keys(keys, 2)
        env_state, obs = env.reset(key_reset)
        plan_mean = jnp.zeros((*obs.shape[:2], horizon, env.action_dim))

        def step(carry, keys):
            env_state, obs, plan_mean, done, total_return, total_cost = carry
            key_act, key_env = split_keys(keys, 2)
            action, plan_mean, _ = act(agent, obs, plan_mean, key_act)
            env_state, obs, reward, cost, terminated, truncated, _ = env.step(env_state, action, key_env)
            total_return, total_cost = total_return + (~done) * reward, total_cost + (~done) * cost
            return (env_state, obs, plan_mean, done | terminated | truncated, total_return, total_cost), None

        zeros = jnp.zeros(obs.shape[:2])
        carry = (env_state, obs, plan_mean, zeros > 0, zeros, zeros)
        carry, _ = jax.lax.scan(step, carry, split_keys(key, env.episode_steps))
        return carry[-2], carry[-1]  # (N, E)

    batches = -(-num_episodes // env.num_envs)
    returns, costs = jax.lax.map(episode_batch, split_keys(keys, batches))  # (batches, N, E)
    per_seed = lambda x: jnp.swapaxes(x, 0, 1).reshape(x.shape[1], -1)[:, :num_episodes]  # noqa: E731
    return per_seed(returns), per_seed(costs)


def split_keys(keys, num):
    """Split each seed's key: (N, 2) -> `num` arrays of (N, 2), as `jax.random.split` would for one seed."""
    return jnp.swapaxes(jax.vmap(lambda key: jax.random.split(key, num))(keys), 0, 1)


def pure_env(module, num_seeds, num_envs):
    """A pure-JAX env module (reset, step) batched over seeds and envs, stepped inside the scan itself."""

    def reset_seed(key):
        states, obs = jax.vmap(module.reset)(jax.random.split(key, num_envs))
        return (states, jnp.zeros(num_envs, bool)), obs

    def step_seed(env_state, action, key):
        states, ended = env_state
        stepped, obs, reward, cost, terminated, truncated = jax.vmap(module.step)(states, action)
        (fresh, _), fresh_obs = reset_seed(key)
        pick = lambda new, old: jnp.where(ended.reshape(-1, *[1] * (new.ndim - 1)), new, old)  # noqa: E731
        states, obs = jax.tree.map(pick, (fresh, fresh_obs), (stepped, obs))
        reward, cost, terminated, truncated = (jnp.where(ended, jnp.zeros_like(x), x)
                                              for x in (reward, cost, terminated, truncated))
        raw_steps = jnp.where(ended, 0, 1)
        return (states, terminated | truncated), obs, reward, cost, terminated, truncated, raw_steps

    return Env(num_seeds, num_envs, module.OBS_DIM, module.ACT_DIM, 1, module.EPISODE_LENGTH, jax.vmap(reset_seed),
               jax.vmap(step_seed))


def host_env(vector_env, num_seeds, obs_dim, action_dim, action_repeat, episode_steps, mesh=None):
    """N x E worker processes (seed-major), stepped from inside `jit` by one ordered host callback per vector step.

    JAX cannot `vmap` an ordered callback, so this one takes every seed's actions at once.  Under a device `mesh`
    (seeds sharded over devices) the callback runs once, on the first device: its input is gathered there and its
    output scattered back, which the replicated sharding constraints make explicit.
    """
    num_envs = vector_env.num_envs // num_seeds
    shape = (num_seeds, num_envs)
    out = (jax.ShapeDtypeStruct((*shape, obs_dim), jnp.float32), jax.ShapeDtypeStruct(shape, jnp.float32),
           jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape, jnp.bool_),
           jax.ShapeDtypeStruct(shape, jnp.bool_), jax.ShapeDtypeStruct(shape, jnp.int32))
    replicated = (lambda x: x) if mesh is None else functools.partial(
        jax.lax.with_sharding_constraint, shardings=NamedSharding(mesh, PartitionSpec()))
    sharding = None if mesh is None else jax.sharding.make_single_device_sharding(mesh.devices.flat[0])
    callback = functools.partial(io_callback, ordered=True, sharding=sharding)

    def host_step(action):  # (N, E, A) -> the outputs above, all seeds' workers in one vector step
        stepped = vector_step(vector_env, np.asarray(action).reshape(num_seeds * num_envs, action_dim))
        return tuple(x.reshape(*shape, *x.shape[1:]) for x in stepped)

    def reset(keys):
        obs = callback(lambda: vector_reset(vector_env).reshape(*shape, obs_dim), out[0])
        return (), replicated(obs)

    def step(env_state, action, keys):
        return ((), *replicated(callback(host_step, out, replicated(action))))

    return Env(num_seeds, num_envs, obs_dim, action_dim, action_repeat, episode_steps, reset, step)


# Env seeds.  Run seed s owns the block [ENV_SEED_STRIDE s, ENV_SEED_STRIDE (s + 1)): training env i is seeded
# ENV_SEED_STRIDE s + i, eval env i ENV_SEED_STRIDE s + EVAL_OFFSET + i and the video env the block's last seed, so
# the envs of different seeds (and of training and evaluation) never share a seed.
ENV_SEED_STRIDE = 10_000
EVAL_OFFSET = 5_000
MAX_ENVS_PER_KIND = EVAL_OFFSET - 1


def env_seeds(seed, num_seeds, num_envs, offset=0):
    """The env seeds of runs seed..seed+num_seeds-1, seed-major: (num_seeds x num_envs,)."""
    return [ENV_SEED_STRIDE * (seed + s) + offset + i for s in range(num_seeds) for i in range(num_envs)]


def video_env_seed(seed):
    return ENV_SEED_STRIDE * (seed + 1) - 1


def num_workers(args):
    """Worker processes a Safety-Gymnasium run starts: training plus eval envs, for every seed."""
    return args.num_seeds * (args.num_envs + min(args.eval_episodes, args.num_envs))


def make_envs(args, mesh=None):
    """Training and eval envs for all seeds: the same batched interface over a pure-JAX task or Safety-Gymnasium
    workers.  Returns (env, eval_env, the vector envs to close)."""
    num_eval = min(args.eval_episodes, args.num_envs)
    if args.env_id in JAX_ENVS:
        module = JAX_ENVS[args.env_id]
        return pure_env(module, args.num_seeds, args.num_envs), pure_env(module, args.num_seeds, num_eval), []
    vector_envs = [make_vector_env(args.env_id, env_seeds(args.seed, args.num_seeds, args.num_envs),
                                   args.action_repeat, "training"),
                   make_vector_env(args.env_id, env_seeds(args.seed, args.num_seeds, num_eval, EVAL_OFFSET),
                                   args.action_repeat, "eval")]
    obs_dim, action_dim = vector_envs[0].single_observation_space.shape[0], vector_envs[0].single_action_space.shape[0]
    episode_steps = -(-vector_envs[0].get_attr("spec")[0].max_episode_steps // args.action_repeat)
    envs = [host_env(v, args.num_seeds, obs_dim, action_dim, args.action_repeat, episode_steps, mesh)
            for v in vector_envs]
    return *envs, vector_envs
