"""Speed of SPOWL: one planning call, one gradient update, the raw vector env, the whole training loop, and a
checkpoint write.

    python benchmark.py --latent-dim 64 --mlp-dim 128 --enc-dim 64 --num-samples 64 --num-pi-trajs 8 \
        --num-elites 16 --batch-size 64 --num-envs 2                                  # the README's small size, CPU
    python benchmark.py --num-envs 10                                                 # paper size (GPU)

Takes the same flags as spowl.py (sizes, --num-envs, --env-id, --num-seeds).  Prints, after compilation:
  - ms per planning call (all envs) and per gradient update, with the FLOPs of each call counted twice -- by XLA's
    cost analysis of the compiled call and by summing the matmuls of its jaxpr (cost analysis has miscounted dot
    products on some backends) -- the GFLOP/s achieved, and the program's size in operations (jaxpr equations,
    loop bodies once: what tracing, compiling and, on a GPU, launching kernels scale with);
  - ms per raw env step of the vector env alone (Safety-Gymnasium);
  - the training loop end to end: compile time, then raw env steps/s over `loop-steps` vector steps of learning
    (planning, env steps, buffer adds and updates), per seed and in total;
  - the size and write time of the run's checkpoint (replay buffer included);
  - with `--trace-dir`, profiler traces of more planning calls, updates and two rounds of the loop, and what the
    device did in them: kernels and busy time per call or vector step, in all and per program, the costliest kernels
    (on a GPU, with a jax that has `jax.profiler.ProfileData`; the traces open in TensorBoard or Perfetto on any
    backend).
"""

import collections
import glob
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import tyro

import buffer as replay
import driver
import envs
import spowl
from planner import act


def median_ms(fn, repeats):
    """Median wall time of `fn()` in ms, after one call that compiles it."""
    jax.block_until_ready(fn())
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
        zeros = jnp.zeros((args.num_seeds, args.num_envs))
        reset = lambda keys: ((), jnp.zeros((*zeros.shape, obs_dim)))  # noqa: E731

        def step(env_state, action, keys):  # `init` traces a round of acting (its empty first round): shapes only
            return *reset(keys), zeros, zeros, zeros > 0, zeros > 0, zeros.astype(jnp.int32)

        env = envs.Env(args.num_seeds, args.num_envs, obs_dim, action_dim, args.action_repeat, 0, reset, step)
    keys = jnp.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])
    shapes = jax.eval_shape(spowl.make_train(args, env, env).init, keys)
    runner = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
    with tempfile.TemporaryDirectory(dir=".") as run_dir:  # on the disk runs are written to, not a RAM disk
        start = time.perf_counter()
        driver.save_checkpoint(run_dir, runner, {})
        seconds = time.perf_counter() - start
        return os.path.getsize(os.path.join(run_dir, "checkpoint.npz")) / 1e6, seconds




def matmul_flops(jaxpr, dtype=None):
    """FLOPs of the matrix products in a jaxpr: 2 x (batch x M x K x N) per `dot_general`, times the length of every
    scan around it; of a `cond`, the costliest branch.  Given a `dtype`, only the products whose inputs have it."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and dtype in (None, eqn.invars[0].aval.dtype):
            (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
        if eqn.primitive.name == "cond":
            total += max(matmul_flops(branch.jaxpr, dtype) for branch in eqn.params["branches"])
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"].jaxpr, dtype)
        else:  # calls (pjit, custom_jvp, ...)
            total += sum(matmul_flops(sub, dtype) for sub in sub_jaxprs(eqn))
    return total


def sub_jaxprs(eqn):
    """The jaxprs an equation holds among its parameters (scan and cond bodies, the callee of a call), as Jaxprs."""
    for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
            sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
            if hasattr(sub, "eqns"):
                yield sub


def operations(jaxpr):
    """The size of a program: the equations of its jaxpr, those of every sub-jaxpr (scan and cond bodies, calls)
    included, each once however often it runs."""
    return sum(1 + sum(operations(sub) for sub in sub_jaxprs(eqn)) for eqn in jaxpr.eqns)


def device_activity(trace_dir, calls, seconds):
    """What the accelerator did in `calls` calls traced into `trace_dir` over `seconds` of wall time, read back with
    `jax.profiler.ProfileData` (newer jax than the CPU pin): per line (stream) of each device plane that ran
    anything (a kernel per call or more), the kernels per call and their summed time per call as a share of the
    wall time -- many kernels and a low share mean that launch latency, not arithmetic, sets the pace; then the same
    per program (in the training loop, the actor's round and the learner's, which share the device); then the kernels
    that took the most time."""
    if getattr(jax.profiler, "ProfileData", None) is None:
        print(f"  trace in {trace_dir}; this jax cannot read it back (jax.profiler.ProfileData)")
        return
    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    planes = [p for p in jax.profiler.ProfileData.from_file(path).planes if p.name.startswith("/device:")]
    if not planes:
        print(f"  trace in {trace_dir}: no device plane (a CPU run, or a GPU without CUPTI)")
    per_call = lambda ns: ns / 1e6 / calls  # noqa: E731  (ms per call)
    share = lambda ms: f"{100 * ms / (1000 * seconds / calls):.0f} % of the wall time"  # noqa: E731
    kernel_ms, program_kernels, program_ms = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in planes:
        for line in plane.lines:
            events = list(line.events)
            if len(events) < calls:  # idle, or a stray copy
                continue
            busy = per_call(sum(e.duration_ns for e in events))
            print(f"  {plane.name} {line.name}: {len(events) / calls:.0f} kernels, {busy:.2f} ms per call "
                  f"({share(busy)})")
            for e in events if line.name.startswith("Stream") else []:  # not derived lines (XLA Ops, Modules)
                program = dict(e.stats).get("hlo_module", "?")
                kernel_ms[f"{program}: {e.name[:60]}"] += per_call(e.duration_ns)
                program_kernels[program] += 1
                program_ms[program] += per_call(e.duration_ns)
    for program, ms in program_ms.most_common():
        if program_kernels[program] >= calls:
            print(f"    program {program}: {program_kernels[program] / calls:.0f} kernels, {ms:.2f} ms per call "
                  f"({share(ms)})")
    for name, ms in kernel_ms.most_common(8):
        print(f"    {ms:.3f} ms per call  {name}")


def profile(name, fn, *inputs, repeats, trace_dir=None):
    """Time a jitted call and count its FLOPs both ways; prints one line.  With `trace_dir`, then trace `repeats` more
    calls there and summarise what the device did (`device_activity`)."""
    compiled = jax.jit(fn).lower(*inputs).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    xla_flops = float((analysis or {}).get("flops", float("nan")))
    jaxpr = jax.make_jaxpr(fn)(*inputs).jaxpr
    counted, bfloat16 = matmul_flops(jaxpr), matmul_flops(jaxpr, jnp.bfloat16)
    ms = median_ms(lambda: compiled(*inputs), repeats)
    share = f", {100 * bfloat16 / counted:.1f} % in bfloat16" if bfloat16 else ""
    print(f"{name}: {ms:.1f} ms | {xla_flops / 1e9:.3f} GFLOP (XLA cost analysis), {counted / 1e9:.3f} GFLOP "
          f"(matmuls of the jaxpr{share}) | {counted / ms / 1e6:.1f} GFLOP/s | {operations(jaxpr):,} operations")
    if trace_dir and repeats:
        trace_dir = os.path.join(trace_dir, name.split(" (")[0].replace(" ", "_"))
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            for _ in range(repeats):
                out = compiled(*inputs)
            jax.block_until_ready(out)
            seconds = time.perf_counter() - start
        device_activity(trace_dir, repeats, seconds)
    return ms


def time_env(args, action_dim, env_steps):
    """The raw vector env alone, stepped with uniform random actions."""
    vector_env = envs.make_vector_env(args.env_id, envs.env_seeds(args.seed, 1, args.num_envs), args.action_repeat)
    envs.vector_reset(vector_env)
    start, raw = time.perf_counter(), 0
    for _ in range(env_steps):
        raw += int(envs.vector_step(vector_env, np.random.uniform(-1, 1, (args.num_envs, action_dim)))[-1].sum())
    seconds = time.perf_counter() - start
    vector_env.close()
    print(f"raw vector env alone: {1000 * seconds / raw:.3f} ms per raw env step, {raw / seconds:.0f} raw env steps/s "
          f"({args.num_envs} envs, action repeat {args.action_repeat}, resets included)")


def time_loop(args, loop_steps, trace_dir=None):
    """The training loop of spowl.py: compile once, fill the random phase, then time `loop_steps` vector steps of
    learning (actor and learner side by side, in rounds of `sync-every` steps, as a run plays them).  With
    `trace_dir`, then trace two whole rounds in the middle of four more and summarise what the device did."""
    mesh = driver.seed_mesh(args.num_seeds)
    env, eval_env, vector_envs = envs.make_envs(args, mesh if mesh.size > 1 else None)
    try:
        steps_per_vector_step = args.num_envs * env.action_repeat
        interval = loop_steps * steps_per_vector_step
        keys = jnp.stack([jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)])
        train, by_runner = driver.jit_over_seeds(spowl.make_train(args, env, eval_env), mesh, keys)
        keys = jax.device_put(keys, by_runner.key)
        start = time.perf_counter()
        compiling = driver.compile_train(train, keys)
        train = train._replace(**{name: program.result() for name, program in compiling.items()})
        runner = train.init(keys)
        compile_seconds = time.perf_counter() - start
        learning_starts = max(args.learning_starts, (args.horizon + 1) * steps_per_vector_step)
        end = 2**31 - 1  # the actor plays every step
        with driver.ThreadPoolExecutor(1) as learner:
            runner = driver.play(train, runner, learning_starts, end, learner)  # the random phase
            first = int(runner.actor.global_step[0])
            start = time.perf_counter()
            runner = jax.block_until_ready(driver.play(train, runner, first + interval, end, learner))
            seconds = time.perf_counter() - start
            raw = int(runner.actor.global_step[0]) - first
            print(f"training loop: compile {compile_seconds:.1f} s (init, rounds and eval); {raw / seconds:.1f} raw "
                  f"env steps/s per seed, {args.num_seeds * raw / seconds:.1f} in all ({args.num_seeds} seed(s), "
                  f"{args.num_envs} envs, {1000 * seconds / (raw / steps_per_vector_step):.1f} ms per vector step, "
                  f"utd {args.utd_ratio}, sync every {args.sync_every})")
            if trace_dir:
                trace_rounds(train, runner, learner, os.path.join(trace_dir, "training_loop"),
                             4 * args.sync_every * steps_per_vector_step, steps_per_vector_step)
    finally:
        for v in vector_envs:
            v.close()


def trace_rounds(train, runner, learner, trace_dir, raw_steps, steps_per_vector_step):
    """Play `raw_steps` more (four rounds or more), tracing the second and third rounds (from one round's end to
    another's, actor and learner side by side), and summarise what the device did."""
    seen = []  # (time, global step) at each round's end

    def on_round(rounds):
        seen.append((time.perf_counter(), int(np.max(rounds["act"]["global_step"]))))
        if len(seen) == 1:
            jax.profiler.start_trace(trace_dir)
        elif len(seen) == 3:
            jax.profiler.stop_trace()

    driver.play(train, runner, int(runner.actor.global_step[0]) + raw_steps, 2**31 - 1, learner, on_round)
    (start, first), (stop, last) = seen[0], seen[2]
    print(f"training loop, traced: {(last - first) // steps_per_vector_step} vector steps in {stop - start:.2f} s")
    device_activity(trace_dir, (last - first) // steps_per_vector_step, stop - start)


def main(args: spowl.Args, repeats: int = 20, env_steps: int = 600, loop_steps: int = 100, checkpoint: bool = True,
         trace_dir: str | None = None):
    """`repeats` calls time the planning call and the update, `env_steps` vector steps of random actions the raw env,
    `loop_steps` vector steps the training loop (0 skips any of them); `checkpoint` times a checkpoint write.
    `trace_dir` keeps profiler traces of more planning calls and updates, after the timed ones, and of two rounds of
    the loop, after its timed steps, and prints what the device did in them (`device_activity`)."""
    args = spowl.check(args)
    driver.check_args(args)
    if args.env_id in envs.JAX_ENVS:
        module = envs.JAX_ENVS[args.env_id]
        obs_dim, action_dim = module.OBS_DIM, module.ACT_DIM
    else:
        probe = envs.make_env(args.env_id, args.action_repeat, args.seed)
        obs_dim, action_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
        probe.close()
    if checkpoint:
        size, seconds = checkpoint_write(args, obs_dim, action_dim)
        print(f"checkpoint ({args.buffer_size:,}-transition buffer): {size:.0f} MB written in {seconds:.1f} s")
    key = jax.random.PRNGKey(args.seed)
    agent = spowl.init_agent(key, args, obs_dim, action_dim)
    h, b, e = args.horizon, args.batch_size, args.num_envs
    batch = replay.Batch(jax.random.normal(key, (h + 1, b, obs_dim)), jnp.zeros((h, b, action_dim)), jnp.zeros((h, b)),
                         jnp.zeros((h, b)), jnp.zeros((h, b)), jnp.ones((h, b), bool))
    obs, mean = jax.random.normal(key, (e, obs_dim)), jnp.zeros((e, h, action_dim))
    device = jax.devices()[0]
    print(f"{device.platform} ({device.device_kind}): latent {args.latent_dim}, mlp {args.mlp_dim}, "
          f"{args.num_samples} samples x {args.iterations} iterations, batch {b}, {e} envs")
    if repeats:
        profile(f"planning call ({e} envs, act={args.act})",
                lambda model, policy, obs, mean, key: act(model, policy, obs, mean, key, args), agent.model,
                agent.policy, obs, mean, key, repeats=repeats, trace_dir=trace_dir)
        profile("gradient update", lambda agent, batch, key: spowl.update(agent, batch, key, args), agent, batch, key,
                repeats=repeats, trace_dir=trace_dir)
    if env_steps and args.env_id not in envs.JAX_ENVS:
        time_env(args, action_dim, env_steps)
    if loop_steps:
        time_loop(args, loop_steps, trace_dir)


if __name__ == "__main__":
    tyro.cli(main, config=(tyro.conf.OmitArgPrefixes,))
