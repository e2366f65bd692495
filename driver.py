"""The run machinery of spowl.py: input checks, compiling, the actor/learner threads, logging, evaluation, checkpoints
and resume, stop signals, NaN and worker failures, provenance and video.

It works on the config and on the pure functions that `make_train` returns (spowl.py, which hands its run here), and
changes nothing about what they compute: the agent that acts in round k depends on k alone, whatever the intervals
of rows, evaluations and checkpoints, and a run stopped by a signal and resumed continues as if it had not stopped.
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
import uuid
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Annotated, Union
from zlib import error as zlib_error

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import buffer as replay
import envs

# ---------------------------------------------------------------------------------------------------------------------
# The config: presets, checks, --resume and the run directory

RESUMABLE_FLAGS = {"total_timesteps", "resume", "log_dir", "progress_bar", "track", "max_env_workers"}  # may differ


def flag(name):
    return "--" + name.replace("_", "-")


def check_args(args):
    """The run's settings (spowl.check checks the algorithm's): raises ValueError naming the offending flag.  Runs
    before any env starts or anything compiles."""
    for name in ["total_timesteps", "num_seeds", "log_every", "eval_every", "eval_episodes", "checkpoint_every",
                 "sync_every"]:
        if not getattr(args, name) > 0:
            raise ValueError(f"{flag(name)} must be positive, got {getattr(args, name)}")
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
            raise ValueError("--track needs Weights & Biases: pip install \"wandb>=0.19.10\"") from None


def prepare_run(args, cli_flags, check):
    """Check the config with `check` (the algorithm's, which also resolves --act) and `check_args`, and resolve
    --resume and --log-dir: (args, resuming?).  Never touches an existing run.  config.json stores the resolved
    config, so a resumed run acts as it did."""
    if args.resume is None:
        args = check(args)
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
    try:
        with open(config_path) as f:
            saved = type(args)(**json.load(f))
    except (OSError, ValueError, TypeError) as error:  # unreadable, not JSON, or fields this code does not know
        raise ValueError(f"--resume {args.resume}: cannot read {config_path} ({error})") from None
    for name in cli_flags - RESUMABLE_FLAGS:
        if getattr(args, name) != getattr(saved, name):
            raise ValueError(f"{flag(name)} differs from the saved config of {args.resume}; leave it out to resume")
    overrides = {name: getattr(args, name) for name in cli_flags & (RESUMABLE_FLAGS - {"resume", "log_dir"})}
    args = check(dataclasses.replace(saved, resume=args.resume, log_dir=args.resume, **overrides))
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


# The checkpoint: `format_version`, `counters` (JSON: the event counters and the checkpoint's global_step) and each of
# the runner's arrays under its pytree path (".agent.model.encoder..."), so that a runner with new state no longer
# fits an older checkpoint and --resume names what differs.  The version changes only with this layout.
CHECKPOINT_FORMAT = 4


def arrays_by_path(tree):
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def save_checkpoint(run_dir, runner, counters):
    """Everything to continue the run -- parameters, optimiser and Lagrangian state, replay buffer, env state, the
    last rollout, PRNG keys and counters -- as one `checkpoint.npz`.  It is written to `checkpoint.npz.tmp`, flushed
    to disk and renamed, so a kill or a failed write at any moment leaves the previous checkpoint whole; a failed
    write removes the temporary file and raises OSError."""
    path = os.path.join(run_dir, "checkpoint.npz")
    data = io.BytesIO()  # built in memory: a zip file that failed halfway on disk would complain again when collected
    np.savez(data, format_version=CHECKPOINT_FORMAT, counters=json.dumps(counters),
             **jax.device_get(arrays_by_path(runner)))
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        os.remove(path + ".tmp")
        raise
    os.replace(path + ".tmp", path)


def read_checkpoint(run_dir, read=lambda data: None):
    """(counters, read(data)) of the checkpoint in `run_dir`; ValueError, naming the file, unless it is one this code
    wrote, whole, in this format."""
    path = os.path.join(run_dir, "checkpoint.npz")
    try:
        with np.load(path) as data:
            version = int(data["format_version"]) if "format_version" in data.files else None
            if version == CHECKPOINT_FORMAT:
                counters, contents = json.loads(str(data["counters"])), read(data)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib_error) as error:  # missing, foreign, cut
        raise ValueError(f"--resume {run_dir}: cannot read {path} ({type(error).__name__}: {error})") from None
    if version != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {run_dir}: the checkpoint {path} has format version "
                         f"{version or 'none (older code)'}, this code reads version {CHECKPOINT_FORMAT}")
    return counters, contents


def checkpoint_counters(run_dir):
    return read_checkpoint(run_dir)[0]


def load_checkpoint(run_dir, template):
    """The saved runner (into the structure of `template`) and counters; ValueError, naming the arrays, if they do not
    fit it."""
    expected = arrays_by_path(template)
    counters, saved = read_checkpoint(run_dir, lambda data: {name: data[name] for name in data.files
                                                             if name not in ("format_version", "counters")})
    differ = sorted(expected.keys() ^ saved.keys()) + sorted(
        name for name in expected.keys() & saved.keys()
        if (saved[name].shape, saved[name].dtype) != (expected[name].shape, expected[name].dtype))
    if differ:
        raise ValueError(f"--resume {run_dir}: the checkpoint's arrays do not match this code's runner at "
                         f"{len(differ)} path(s): {', '.join(differ[:3])}" + (", ..." if len(differ) > 3 else ""))
    restored = [jnp.asarray(saved[name]) for name in expected]  # in the template's leaf order
    return jax.tree.unflatten(jax.tree.structure(template), restored), counters


def continue_episodes(restored, fresh):
    """A restored runner, settled, continuing in host envs that were just reset (`fresh` is a new runner on them): take
    their fresh observations, and mark the last stored entry as an episode end (truncated) so no loss spans the gap."""

    @jax.vmap
    def one_seed(buffer, actor, new):
        last = (buffer.position - 1) % buffer.truncated.shape[1]
        buffer = buffer._replace(truncated=buffer.truncated.at[:, last].set(True))
        zeros = jnp.zeros(new.obs.shape[0])
        buffer = replay.add(buffer, new.obs, jnp.zeros_like(new.plan_mean[:, 0]), zeros, zeros, zeros > 0, zeros > 0)
        return buffer, actor._replace(obs=new.obs, ended=new.ended, plan_mean=new.plan_mean,
                                      episode_return=new.episode_return, episode_cost=new.episode_cost)

    buffer, actor = one_seed(restored.buffer, restored.actor, fresh.actor)
    return restored._replace(buffer=buffer, actor=actor)


class Logger:
    """One JSON object per row appended to <run>/metrics.jsonl, the same scalars as TensorBoard events (a writer per
    seed when several train at once), and with --track a W&B run per seed, grouped under the run directory's name.

    A run resumed from a checkpoint at `resume_step` runs the steps after it again, so metrics.jsonl keeps only its
    rows up to that step and TensorBoard purges its later events: both see each step once, in order.  The W&B runs'
    ids are kept in <run>/wandb_ids.json, so a resume continues the same runs (W&B ignores the steps it has seen)."""

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
        self.wandb = {}
        if args.track:
            import wandb

            ids_path = os.path.join(args.log_dir, "wandb_ids.json")
            name = os.path.basename(os.path.normpath(args.log_dir))
            ids = {str(s): uuid.uuid4().hex[:12] for s in seeds}
            if os.path.exists(ids_path):
                with open(ids_path) as f:
                    ids = json.load(f)
            with open(ids_path, "w") as f:
                json.dump(ids, f)
            for s in seeds:
                self.wandb[s] = wandb.init(project=args.wandb_project, group=name, id=ids[str(s)], resume="allow",
                                           name=name if args.num_seeds == 1 else f"{name}/seed_{s}", dir=args.log_dir,
                                           config={**dataclasses.asdict(args), "seed": s}, reinit="create_new")

    def write(self, rows):
        with open(self.path, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        for row in rows:
            scalars = {tag: value for tag, value in row.items() if tag not in ("global_step", "seed")}
            for tag, value in scalars.items():
                self.writers[row["seed"]].add_scalar(tag, value, row["global_step"])
            if self.wandb:
                self.wandb[row["seed"]].log(scalars, step=row["global_step"])

    def close(self):
        for writer in self.writers.values():
            writer.close()
        for run in self.wandb.values():
            run.finish()


# ---------------------------------------------------------------------------------------------------------------------
# Metrics.  Every per-step quantity the actor's or the learner's round returns is logged, averaged between rows: the
# actor's planner and switch diagnostics over its planning steps, the learner's losses and diagnostics over the steps
# whose updates were made.  A quantity is logged under its paper name below, or else as act/<name> or update/<name>.

BOOKKEEPING = {"active", "learning", "updated", "global_step", "ended", "episode_return", "episode_cost"}
LAST_VALUE = {"multiplier", "penalty"}  # the learner's state: the row shows its value at the row's step
LOG_NAMES = {"consistency": "losses/consistency", "reward": "losses/reward", "value": "losses/value",
             "cost": "losses/cost", "cost_value": "losses/cost_value", "model_loss": "losses/model",
             "policy_loss": "losses/policy", "reward_loss": "losses/policy_reward", "psi": "losses/psi",
             "delta": "lagrange/delta", "multiplier": "lagrange/lambda", "penalty": "lagrange/mu",
             "scale": "policy/scale", "entropy": "policy/entropy", "q_target": "values/q_target",
             "cost_value_target": "values/cost_value_target", "param_norm": "charts/param_norm",
             "used_plan": "plan/balance", "elites": "plan/elites", "no_improvement": "plan/no_improvement",
             "d_reward": "plan/d_reward", "d_cost": "plan/d_cost", "q_low": "switch/q_low", "qc_high": "switch/qc_high"}


def log_name(name, side):
    return LOG_NAMES.get(name, f"{side}/{name}")


def counted_steps(metrics, side):
    """The steps (steps, ...) of a round's metrics that count towards averages: the actor's planning steps, or the
    learner's steps whose updates were made."""
    return metrics["active"] & metrics["learning"] if side == "act" else metrics["updated"]


def first_non_finite(rounds, first_seed):
    """Names the earliest NaN or +-inf in a round's metrics -- {"act": ..., "update": ...}, numpy, (steps, seeds,
    ...) -- with its global step and seed; None if there is none."""
    found = []  # (global step, seed index, log key, value) of each quantity's first non-finite value
    for side, metrics in rounds.items():
        live = metrics["active"]
        for name, values in metrics.items():
            if name in BOOKKEEPING or not np.issubdtype(values.dtype, np.floating):
                continue
            bad = np.argwhere(~np.isfinite(values) & live.reshape(live.shape + (1,) * (values.ndim - 2)))
            if len(bad):
                t, i = bad[0][:2]
                found.append((int(metrics["global_step"][t, i]), int(i), log_name(name, side), values[t, i]))
    if not found:
        return None
    step, i, key, value = min(found)
    also = sum(1 for other in found if other[:2] == (step, i)) - 1
    more = f" (and {also} more there)" if also else ""
    return f"{key} became {value} at step {step} (seed {first_seed + i}){more}"


class Tracker:
    """Accumulates one seed's per-step round outputs between log rows."""

    def __init__(self):
        self.sums, self.counts, self.last, self.returns, self.costs = {}, {}, {}, [], []

    def add(self, rounds):  # {"act": ..., "update": ...}: this seed's round outputs, numpy, a leading step axis
        for side, metrics in rounds.items():
            counted = counted_steps(metrics, side)
            for name in [name for name in metrics if name not in BOOKKEEPING]:  # in order: rows list keys alike
                key = log_name(name, side)
                if name in LAST_VALUE:
                    if metrics["active"].any():
                        self.last[key] = float(metrics[name][metrics["active"]][-1])
                elif counted.any():
                    self.sums[key] = self.sums.get(key, 0.0) + float(metrics[name][counted].sum())
                    self.counts[key] = self.counts.get(key, 0) + int(counted.sum())
        if "act" in rounds:
            collected = rounds["act"]
            ended = collected["ended"] & collected["active"][:, None]
            self.returns += collected["episode_return"][ended].tolist()
            self.costs += collected["episode_cost"][ended].tolist()

    def row(self):
        row = {**self.last, **{key: total / self.counts[key] for key, total in self.sums.items()}}
        if self.returns:
            row.update({"train/episode_return": float(np.mean(self.returns)),
                        "train/episode_cost": float(np.mean(self.costs))})
        self.sums, self.counts, self.returns, self.costs = {}, {}, [], []
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


# ---------------------------------------------------------------------------------------------------------------------
# A run: devices, stop signals, the loop of rounds, rows, evaluations and checkpoints


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


def train(args, resuming, make_train):
    """Run (or continue) training in args.log_dir: rounds of actor and learner, with rows, evaluations and checkpoints.

    Raises RunStopped on a stop signal (after a checkpoint), a NaN or inf, a failed env worker or a failed write
    (keeping the last checkpoint)."""
    record_provenance(args.log_dir)
    os.makedirs(args.log_dir, exist_ok=True)
    if not resuming:
        with open(os.path.join(args.log_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)
    mesh = seed_mesh(args.num_seeds)
    if mesh.devices.flat[0].platform == "cpu" and max(args.latent_dim, args.num_samples) >= 256:
        print("note: near the paper's size a CPU takes seconds per planning call; the README gives small-size flags "
              "for CPU runs", flush=True)
    with StopSignals() as signals:
        env, eval_env, signals.workers = envs.make_envs(args, mesh if mesh.size > 1 else None)
        try:
            return train_loop(args, resuming, mesh, make_train(args, env, eval_env), signals)
        except jax.errors.JaxRuntimeError:
            failure = next((v.failure for v in signals.workers if v.failure), None)
            if failure is None:
                raise
            raise RunStopped(f"error: {failure}; the last checkpoint is kept in {args.log_dir}") from None
        finally:
            for v in signals.workers:
                v.close(terminate=v.failure is not None)


# ---------------------------------------------------------------------------------------------------------------------
# Rounds: compiled ahead of time, played by an actor and a learner side by side


def jit_over_seeds(fns, mesh, keys):
    """`fns` jitted with the seed axis -- the leading axis of the runner and of the keys (N, 2), the second of a
    round's transitions and per-step metrics -- split over the mesh's devices (`jit` partitions the rest); and the
    runner's sharding.  The actor's state and the learner's buffer are updated in place (donated)."""
    by_seed, by_step_and_seed, replicated = (NamedSharding(mesh, PartitionSpec("seed")),
                                             NamedSharding(mesh, PartitionSpec(None, "seed")),
                                             NamedSharding(mesh, PartitionSpec()))
    shapes = jax.eval_shape(fns.init, keys)
    by_round = shapes.last_rollout._replace(transitions=by_step_and_seed, active=replicated, learning=replicated,
                                            global_step=replicated)
    by_runner = shapes._replace(agent=by_seed, buffer=by_seed, actor=by_seed, key=by_seed, last_rollout=by_round)
    return fns._replace(init=jax.jit(fns.init, out_shardings=by_runner),
                        collect=jax.jit(fns.collect, donate_argnums=0, in_shardings=(by_seed, by_seed, replicated),
                                        out_shardings=(by_seed, by_round, by_step_and_seed)),
                        learn=jax.jit(fns.learn, donate_argnums=1, in_shardings=(by_seed, by_seed, by_seed, by_round),
                                      out_shardings=(by_seed, by_seed, by_seed, by_step_and_seed)),
                        evaluate=jax.jit(fns.evaluate, in_shardings=by_seed, out_shardings=by_seed)), by_runner


def compile_train(train, keys):
    """The run's programs, compiled ahead of time side by side on threads: a dict of futures of the compiled init,
    actor's and learner's rounds, and evaluation.  `keys` are the seeds' keys init will take.

    Tracing takes the GIL, so each program is traced in turn and starts compiling as soon as it is traced: the
    learner's first, as the longest to compile.  Meanwhile a run can already act (`when_compiled`, `play`).  On a CPU
    the actor's, the evaluation's and init's programs compile at XLA's optimisation level 1: in about half the time,
    for planning calls a few % slower, which the learner's longer rounds hide.  The learner's stays at the default
    level, where gradient updates run about 1.6x faster."""
    quick = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None
    runner = jax.eval_shape(train.init, keys)
    pool = ThreadPoolExecutor(4)
    compile_ = lambda lowered, options: pool.submit(lowered.compile, compiler_options=options)  # noqa: E731
    learn = compile_(train.learn.lower(runner.agent, runner.buffer, runner.key, runner.last_rollout), None)
    collect = compile_(train.collect.lower(runner.actor, runner.agent, 0), quick)
    init = compile_(train.init.lower(keys), quick)
    evaluate = compile_(train.evaluate.lower(runner.agent, keys), quick)
    pool.shutdown(wait=False)  # the compiles go on
    return {"init": init, "collect": collect, "learn": learn, "evaluate": evaluate}


def when_compiled(train, compiling):
    """`train` with the functions in `compiling` (futures of compiled programs) replaced by functions that wait for
    their program."""
    return train._replace(**{name: functools.partial(lambda future, *args: future.result()(*args), future)
                             for name, future in compiling.items()})


def done_now(fn):
    """fn() as an already finished future: an executor's `submit`, run on the calling thread."""
    future = Future()
    future.set_result(fn())
    return future


def learn_after(train, previous, rollout):
    """The learner's part of a round: store `rollout` and make its updates, on the learner's state after the rounds
    before it (`previous`, a future).  Returns the agent, buffer, next key and per-step metrics."""
    agent, buffer, key, _ = previous.result()
    return jax.block_until_ready(train.learn(agent, buffer, key, rollout))


def needs_update(rollout):
    """Whether learning from `rollout` changes the agent (it has learning steps)."""
    return bool(np.any(np.asarray(rollout.active) & np.asarray(rollout.learning)))


def play(train, runner, until, stop_at, learner=None, on_round=lambda rounds: None, interrupted=lambda: False):
    """Rounds while the global step is below `until` and, at a round boundary, `interrupted()` is false; the actor
    skips steps from `stop_at` (the run's end) on.  `on_round` gets each round's metrics, {"act": the actor's of this
    round, "update": the learner's of the round before}, numpy-ready (steps, seeds, ...), in order.

    In each round the learner -- on the `learner` thread pool, or before the actor without one: the same result --
    stores the last rollout and makes its updates, while the actor plays the next round with the agent as it is at
    the round's start: the one that has learned from the rounds up to the one before the last rollout.  A round
    without learning steps (the random phase) leaves the agent as it was, so until a round needs updates the actor
    plays on without waiting for the learner: at a run's start the random phase plays while the learner's program
    still compiles."""
    submit = learner.submit if learner is not None else done_now
    agent, actor, last_rollout = runner.agent, runner.actor, runner.last_rollout
    state = done_now(lambda: (runner.agent, runner.buffer, runner.key, None))  # the learner's, after the rounds given
    changes_agent = False  # whether the learner's round now running changes the agent
    unseen = collections.deque()  # rounds `on_round` has not seen yet: (the learner's future, the actor's metrics)

    def show(future, metrics):
        on_round({"act": metrics, "update": future.result()[3]})

    while int(np.asarray(actor.global_step)[0]) < until and not interrupted():  # numpy: no program to compile
        if changes_agent:
            agent = state.result()[0]
        state = submit(functools.partial(learn_after, train, state, last_rollout))
        changes_agent = needs_update(last_rollout)
        actor, last_rollout, metrics = jax.block_until_ready(train.collect(actor, agent, stop_at))
        unseen.append((state, metrics))
        while unseen and unseen[0][0].done():
            show(*unseen.popleft())
    while unseen:
        show(*unseen.popleft())
    agent, buffer, key, _ = state.result()
    return runner._replace(agent=agent, buffer=buffer, actor=actor, key=key, last_rollout=last_rollout)


def settle(train, runner):
    """One more round in which the actor has no step left to play, so that the last rollout is empty: the learner
    stores the last round and makes its updates (a run's end, and a resume in fresh host envs; as `train.run` ends).
    Returns the runner and the learner's metrics."""
    agent, buffer, key, metrics = train.learn(runner.agent, runner.buffer, runner.key, runner.last_rollout)
    actor, empty, _ = train.collect(runner.actor, runner.agent, 0)
    return runner._replace(agent=agent, buffer=buffer, actor=actor, key=key, last_rollout=empty), metrics


def train_loop(args, resuming, mesh, fns, signals):
    """`train`'s loop over the functions `fns` of a run on envs that are up: compile, restore, play rounds, log,
    evaluate, checkpoint, stop."""
    first_keys = [jax.random.PRNGKey(args.seed + i) for i in range(args.num_seeds)]
    train, by_runner = jit_over_seeds(fns, mesh, jnp.stack(first_keys))
    video_act = jax.jit(fns.eval_act) if args.capture_video else None
    seed_keys = lambda key: jax.device_put(jnp.stack(key), by_runner.key)  # noqa: E731
    keys = seed_keys(first_keys)
    train = when_compiled(train, compile_train(train, keys))
    runner = train.init(keys)
    counters = {"next_log": args.log_every, "next_eval": args.eval_every, "next_checkpoint": args.checkpoint_every}
    step = lambda: int(np.max(jax.device_get(runner.actor.global_step)))  # noqa: E731  (equal over seeds)
    saved_step = None  # the step of the last complete checkpoint
    if resuming:
        try:
            restored, counters = load_checkpoint(args.log_dir, runner)
        except ValueError as error:
            raise RunStopped(f"error: {error}") from None
        fresh, runner = runner, jax.device_put(restored, by_runner)
        if signals.workers:  # fresh host envs: the last rollout is learned from before the gap
            runner = jax.device_put(continue_episodes(settle(train, runner)[0], fresh), by_runner)
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

    def record(rounds):  # a round's actor and learner metrics, (steps, seeds, ...): check, track, show
        rounds = jax.device_get(rounds)
        non_finite = first_non_finite(rounds, args.seed)
        if non_finite is not None:
            raise RunStopped(f"error: {non_finite}; {kept()}")
        for i, tracker in enumerate(trackers):
            tracker.add(jax.tree.map(lambda x: x[:, i], rounds))
        if bar is not None and "act" in rounds:
            bar.update(min(int(rounds["act"]["global_step"].max()), args.total_timesteps) - bar.n)

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
            until = min(counters["next_log"], counters["next_eval"], counters["next_checkpoint"],
                        args.total_timesteps)
            runner = play(train, runner, until, args.total_timesteps, learner, record,
                          lambda: signals.received is not None)
            now = step()
            if now < until:
                continue  # a stop signal came
            done = now >= args.total_timesteps
            if done:  # the last round's updates, for the final evaluation and checkpoint
                runner, metrics = settle(train, runner)
                record({"update": metrics})
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


def configure(presets, check, argv):
    """The run's config from command-line flags: (args, resuming?).  `presets` maps names to (description, config);
    an optional first word chooses one, the first by default.  Raises ValueError naming the offending flag."""
    choices = [Annotated[type(config), tyro.conf.subcommand(name, default=config, description=description)]
               for name, (description, config) in presets.items()]
    default = next(iter(presets.values()))[1]
    args = tyro.cli(Union[tuple(choices)], default=default, args=argv, config=(tyro.conf.CascadeSubcommandArgs,))
    if args.capture_video:  # must precede the first import of mujoco (checking --env-id imports it)
        os.environ.setdefault("MUJOCO_GL", "egl")
    cli_flags = {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
    return prepare_run(args, cli_flags & {f.name for f in dataclasses.fields(args)}, check)


def main(presets, check, make_train):
    """A run from the command line: `presets` the named configs, `check` the algorithm's check of a config and
    `make_train` its pure functions (spowl.py)."""
    try:
        args, resuming = configure(presets, check, sys.argv[1:])
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        train(args, resuming, make_train)
    except RunStopped as stop:
        print(stop.message, file=sys.stderr, flush=True)
        sys.exit(stop.code)
