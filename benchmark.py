"""Speed of SPOWL's parts: one planning call, one gradient update, the raw vector env alone, and a checkpoint write.

    python benchmark.py --latent-dim 64 --mlp-dim 128 --num-samples 64 --num-envs 2     # small, CPU
    python benchmark.py --num-envs 10                                                    # paper size (GPU)

Takes the same flags as spowl.py (sizes, --num-envs, --env-id) and prints the median times after compilation.
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import buffer as replay
import envs
import spowl
from planner import act


def median_ms(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def checkpoint_write(args, obs_dim, action_dim):
    """Size (MB) and write time (s) of the run's checkpoint.  The runner's shapes come from `jax.eval_shape` over a
    stand-in env, so nothing is computed; its leaves are zeros, which take as long to write (npz does not compress)."""
    if args.env_id in envs.JAX_ENVS:
        env = envs.make_envs(args)[0]
    else:
        reset = lambda keys: ((), jnp.zeros((args.num_seeds, args.num_envs, obs_dim)))  # noqa: E731
        env = envs.Env(args.num_seeds, args.num_envs, obs_dim, action_dim, args.action_repeat, 0, reset, None)
    keys = jnp.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])
    shapes = jax.eval_shape(spowl.make_train(args, env, env).init, keys)
    runner = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    with tempfile.TemporaryDirectory(dir=".") as run_dir:  # on the disk runs are written to, not a RAM disk
        start = time.perf_counter()
        spowl.save_checkpoint(run_dir, runner, {})
        seconds = time.perf_counter() - start
        return os.path.getsize(os.path.join(run_dir, "checkpoint.npz")) / 1e6, seconds


def main(args: spowl.Args, repeats: int = 20, env_steps: int = 600):
    """`env_steps` vector steps of uniform random actions time the raw env (0 skips it)."""
    args = spowl.resolve_act(args)
    spowl.check_args(args)
    if args.env_id in envs.JAX_ENVS:
        module = envs.JAX_ENVS[args.env_id]
        obs_dim, action_dim = module.OBS_DIM, module.ACT_DIM
    else:
        probe = envs.make_env(args.env_id, args.action_repeat, args.seed)
        obs_dim, action_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
        probe.close()
    size, seconds = checkpoint_write(args, obs_dim, action_dim)
    print(f"checkpoint ({args.buffer_size:,}-transition buffer): {size:.0f} MB written in {seconds:.1f} s")
    key = jax.random.PRNGKey(args.seed)
    agent = spowl.init_agent(key, args, obs_dim, action_dim)
    h, b, e = args.horizon, args.batch_size, args.num_envs
    batch = replay.Batch(jax.random.normal(key, (h + 1, b, obs_dim)), jnp.zeros((h, b, action_dim)), jnp.zeros((h, b)),
                         jnp.zeros((h, b)), jnp.zeros((h, b)), jnp.ones((h, b), bool))
    update = jax.jit(spowl.update, static_argnums=3)
    plan = jax.jit(act, static_argnums=(5, 6))
    obs, mean = jax.random.normal(key, (e, obs_dim)), jnp.zeros((e, h, action_dim))
    print(f"{jax.devices()[0].platform}: latent {args.latent_dim}, mlp {args.mlp_dim}, {args.num_samples} samples x "
          f"{args.iterations} iterations, batch {b}, {e} envs")
    print(f"planning call ({e} envs, act={args.act}): "
          f"{median_ms(lambda: plan(agent.model, agent.policy, obs, mean, key, args, False), repeats):.1f} ms")
    print(f"gradient update: {median_ms(lambda: update(agent, batch, key, args), repeats):.1f} ms")
    if env_steps and args.env_id not in envs.JAX_ENVS:
        vector_env = envs.make_vector_env(args.env_id, envs.env_seeds(args.seed, 1, e), args.action_repeat)
        envs.vector_reset(vector_env)
        start, raw = time.perf_counter(), 0
        for _ in range(env_steps):
            raw += int(envs.vector_step(vector_env, np.random.uniform(-1, 1, (e, action_dim)))[-1].sum())
        print(f"raw vector env alone: {raw / (time.perf_counter() - start):.0f} raw env steps/s "
              f"({e} envs, action repeat {args.action_repeat}, resets included)")
        vector_env.close()


if __name__ == "__main__":
    tyro.cli(main, config=(tyro.conf.OmitArgPrefixes,))
