"""Tests of the run machinery around the algorithm: the driver's rounds, logging, checkpoints and faults, the
Safety-Gymnasium adapter and its workers, the command line, and benchmark.py and report.py.

    pytest -q -m "not slow" -n 2 --dist loadgroup test_driver.py                  # unit tests on both cores
    XLA_FLAGS=--xla_backend_optimization_level=1 pytest -q -m slow test_driver.py   # whole runs, one at a time
"""

import dataclasses
import functools
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro

import benchmark
import driver
import envs
import jax_env
import report
import spowl
from conftest import REPO_DIR, TINY_FLAGS, read_jsonl, read_rows, spowl_cli, spowl_start


# ---------------------------------------------------------------------------------------------------------------------
# The driver's diagnostics rows


def test_tracker_averages_over_planning_steps_and_made_updates_and_logs_every_quantity():
    """The actor's diagnostics average over its planning steps, the learner's over the steps whose updates were made
    (a skipped update's zeros do not count), lambda and mu show their last value, and a quantity no list names --
    as a fork's new diagnostic would be -- is logged too, as act/<name> or update/<name>."""
    active, learning = np.array([True, True, True, False]), np.array([False, True, True, True])
    zeros = np.zeros((4, 2))
    acted = {"active": active, "learning": learning, "global_step": np.arange(4), "ended": zeros > 0,
             "episode_return": zeros, "episode_cost": zeros, "used_plan": np.array([9.0, 0.5, 1.0, 9.0]),
             "no_improvement": np.array([9.0, 0.0, 0.5, 9.0]), "elites": np.array([9.0, 8.0, 6.0, 9.0]),
             "novel_plan_stat": np.array([9.0, 1.0, 2.0, 9.0])}
    updated = np.array([False, False, True, False])  # one learning step's updates skipped (no full window yet)
    learned = {"active": active, "global_step": np.arange(4), "updated": updated,
               "multiplier": np.array([0.1, 0.2, 0.3, 0.4]), "penalty": np.array([1.0, 2.0, 3.0, 4.0]),
               "model_loss": np.array([0.0, 0.0, 5.0, 0.0]), "pid_integral": np.array([0.0, 0.0, 7.0, 0.0])}
    tracker = driver.Tracker()
    tracker.add({"act": acted, "update": learned})
    row = tracker.row()
    assert row == {"plan/balance": 0.75, "plan/no_improvement": 0.25, "plan/elites": 7.0, "act/novel_plan_stat": 1.5,
                   "losses/model": 5.0, "update/pid_integral": 7.0, "lagrange/lambda": 0.3, "lagrange/mu": 3.0}


# ---------------------------------------------------------------------------------------------------------------------
# Safety-Gymnasium adapter (envs.py)

SG_ENV = "SafetyPointGoal1-v0"
SG_EPISODE = 1000 // 5  # agent steps per episode at action repeat 5


def rollout(cheap_reset, num_steps):
    """Observations, rewards, costs and step infos for a fixed seed and action sequence, across one reset."""
    env = envs.make_env(SG_ENV, action_repeat=5, seed=7)
    env.cheap_reset = cheap_reset
    rng = np.random.default_rng(0)
    obs, rewards, costs, infos = [env.reset()[0]], [], [], []
    for _ in range(num_steps):
        # Forward-biased actions so the robot crosses hazards and the costs are not all zero.
        o, r, _, _, info = env.step(np.clip(rng.normal(0.4, 0.6, 2), -1, 1))
        obs.append(o), rewards.append(r), costs.append(info.pop("cost")), infos.append(info)
    return np.stack(obs), np.array(rewards), np.array(costs), infos


def test_cheap_reset_is_bit_identical():
    """Leaving out the skybox changes only the textures: observations, rewards and costs match bit for bit."""
    num_steps = SG_EPISODE + 40  # 1,000 raw steps, the auto-reset (a model rebuild) and 200 raw steps after it
    shipped, cheap = rollout(False, num_steps), rollout(True, num_steps)
    assert cheap[2].sum() > 0
    for a, b in zip(shipped, cheap):
        np.testing.assert_array_equal(a, b)


def test_next_step_auto_reset():
    """The final observation comes with its flag; the next step ignores its action and returns the reset obs."""
    import gymnasium

    vector_env = gymnasium.vector.SyncVectorEnv([functools.partial(envs.make_env, SG_ENV, 5, seed) for seed in (0, 1)])
    obs, _ = vector_env.reset()
    for t in range(SG_EPISODE):
        obs, reward, cost, terminated, truncated, raw_steps = envs.vector_step(vector_env, np.zeros((2, 2), np.float32))
        assert not terminated.any() and truncated.all() == (t == SG_EPISODE - 1) and (raw_steps == 5).all()
    final_obs = obs
    # NaN actions would trip the action rescaling if they were used.
    obs, reward, cost, terminated, truncated, raw_steps = envs.vector_step(vector_env, np.full((2, 2), np.nan, np.float32))
    assert obs.dtype == np.float32 and obs.shape == final_obs.shape and not np.array_equal(obs, final_obs)
    assert (reward == 0).all() and (cost == 0).all() and not (terminated | truncated).any() and (raw_steps == 0).all()
    assert all(env.unwrapped.steps == 0 for env in vector_env.envs)  # a fresh episode, not a continued one
    *_, raw_steps = envs.vector_step(vector_env, np.zeros((2, 2), np.float32))
    assert (raw_steps == 5).all()


@pytest.mark.parametrize("env_id", ["SafetyPointGoal1Vision-v0", "SafetyCarPush2Vision-v0", "Foo-v0",
                                    "SafetyPointGoal1Debug-v0", "SafetyPointGoal1Gymnasium-v0"])
def test_check_env_id_rejects(env_id):
    with pytest.raises(ValueError, match="--env-id"):
        envs.check_env_id(env_id)


@pytest.mark.parametrize("env_id", ["SafetyPointGoal1-v0", "SafetyPointGoal2-v0", "SafetyPointPush1-v0",
                                    "SafetyPointButton1-v0", "SafetyCarGoal1-v0", "SafetyDoggoGoal1-v0",
                                    "SafetyAntGoal1-v0"])
def test_check_env_id_accepts_the_table_1_tasks(env_id):
    envs.check_env_id(env_id)


# ---------------------------------------------------------------------------------------------------------------------
# Training loop end to end (spowl.py as a script)


def cached_env(tmp_path):
    """The environment for runs of one test that share their compiled programs through JAX's persistent cache."""
    # A run whose flags differ only in --log-dir, --total-timesteps or --resume compiles the same programs.  jax 0.12.1
    # keeps the programs with host callbacks there too (the actor's and the evaluation's on Safety-Gymnasium), which
    # jax 0.6.2 did not.
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


@pytest.mark.slow
def test_safety_gymnasium_two_seeds_plan_update_shard_checkpoint_and_resume(tmp_path):
    """A short 2-seed PointGoal1 run at a tiny size that plans and updates; the same run with the seeds sharded over
    2 (forced host) devices gives the same rows, up to float rounding once it learns; a resume continues both seeds."""
    # How closely they must match comes from comparing single calls of 2 seeds on 1 and on 2 devices: an act call
    # agrees bit for bit with 2 or more envs per seed, so the random phase -- episode returns and costs, the cost rate
    # -- must be identical.  (With a single env per seed it is not: XLA's CPU backend then computes each seed's
    # matrix-vector products with another kernel on a device of its own, up to 7.6e-6 apart in one 92-long dot product.)
    # A gradient update does not: with one seed per device XLA sums some gradients over the batch in another order (seen:
    # the LayerNorm offsets' gradients, 6e-11 to 7e-9 apart after one update), and the closed loop of acting on those
    # parameters amplifies that into other episodes within a thousand steps.  So once it learns, each logged loss and
    # diagnostic must agree within 10 % (or 1e-3), or within a quarter of the two seeds' own difference where that is
    # more.  A quantity near zero early on (the Q target, about -0.01 at step 2000, was once 16 % apart after a change
    # that computed the same values with other XLA fusions) then still has to be nearer its own seed's value than the
    # other seed's, so a mix-up of seeds fails.
    run, sharded = str(tmp_path / "run"), str(tmp_path / "sharded")
    flags = ["--env-id", SG_ENV, "--num-seeds", "2", "--num-envs", "2", "--learning-starts", "1000", "--log-every",
             "1000", "--eval-every", "2000", "--eval-episodes", "2", "--checkpoint-every", "2000", "--buffer-size",
             "20000", *TINY_FLAGS]
    # At the default optimisation level: at level 1 XLA compiles the 1- and 2-device programs into numerically
    # different code (seen: other losses from the first updates on, other eval episodes).
    # The resume loads the 1-device learner's program, the longest to compile, from the persistent cache.
    one_device, two_devices = [{**cached_env(tmp_path), "XLA_FLAGS": flags} for flags in
                               ["", "--xla_force_host_platform_device_count=2"]]
    processes = [spowl_start(*flags, "--total-timesteps", "2000", "--log-dir", run, env=one_device),
                 spowl_start(*flags, "--total-timesteps", "2000", "--log-dir", sharded, env=two_devices)]
    (stdout, stderr), (sharded_stdout, sharded_stderr) = [p.communicate(timeout=900) for p in processes]
    assert processes[0].returncode == 0, stderr[-3000:]
    assert processes[1].returncode == 0, sharded_stderr[-3000:]
    assert "JAX: 2 seeds on 1 of 1 local cpu device" in stdout
    assert "JAX: 2 seeds on 2 of 2 local cpu devices" in sharded_stdout
    rows = read_rows(run)
    assert [(r["global_step"], r["seed"]) for r in rows] == [(1000, 1), (1000, 2), (2000, 1), (2000, 2)]
    for i, (row, sharded_row) in enumerate(zip(rows, read_rows(sharded), strict=True)):
        assert row.keys() == sharded_row.keys()
        other_seed = rows[i ^ 1]  # the same step's row of the other seed
        random_phase = row["global_step"] <= 1000
        for key, value in row.items():
            if random_phase or key in ("global_step", "seed"):
                assert sharded_row[key] == value or key == "charts/SPS", key
            elif key.startswith(("losses/", "values/", "policy/", "lagrange/")):
                bound = max(0.1 * abs(value), 1e-3, 0.25 * abs(value - other_seed[key]))
                assert abs(sharded_row[key] - value) <= bound, (key, value, sharded_row[key], other_seed[key])
    for last in rows[-2:]:
        for key in ["eval/return_mean", "eval/cost_mean", "eval/return_std", "eval/cost_std", "train/cost_rate",
                    "losses/consistency", "losses/value", "losses/cost", "losses/cost_value", "losses/policy",
                    "lagrange/lambda", "lagrange/mu", "plan/balance", "charts/SPS"]:
            assert key in last and np.isfinite(last[key]), key
        assert 0.0 <= last["plan/balance"] <= 1.0
    # Two independent runs: other env seeds and other networks give other numbers.
    assert rows[-2]["losses/model"] != rows[-1]["losses/model"]
    assert rows[-2]["train/cost_rate"] != rows[-1]["train/cost_rate"]
    assert os.path.isfile(os.path.join(run, "checkpoint.npz")) and os.path.isfile(os.path.join(run, "config.json"))
    with np.load(os.path.join(run, "checkpoint.npz")) as data:
        assert json.loads(str(data["counters"]))["next_checkpoint"] == 4000

    result = spowl_cli("--resume", run, "--total-timesteps", "3000", env=one_device)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(run)
    assert [r["global_step"] for r in rows] == [1000, 1000, 2000, 2000, 3000, 3000]  # continued from 2000, not 0
    assert len(read_jsonl(os.path.join(run, "provenance.jsonl"))) == 2  # one entry per launch
    # The resumed run updated from its first step on: the restored buffer held 2000 steps, so no random phase.
    for row in rows[-2:]:
        assert "losses/model" in row and row["plan/balance"] >= 0.0
    assert driver.checkpoint_counters(run)["next_checkpoint"] == 4000
    arrays = checkpoint_arrays(run)
    for name, x in arrays.items():  # every piece of state has its seed axis (a round's: the second)
        if not name.startswith((".last_rollout.active", ".last_rollout.learning", ".last_rollout.global_step")):
            assert x.shape[1 if name.startswith(".last_rollout") else 0] == 2, name
    # Each seed's replay buffer kept the first run's data: 1 + 200 + 100 + 1 entries per env (resets included).
    assert arrays[".buffer.size"].tolist() == [1 + 3000 // 10 + 1] * 2


def test_each_launch_appends_its_provenance(tmp_path):
    run = str(tmp_path / "run")
    driver.record_provenance(run)
    driver.record_provenance(run)  # a --resume
    entries = read_jsonl(os.path.join(run, "provenance.jsonl"))
    assert len(entries) == 2
    entry = entries[-1]
    assert {"time", "command", "commit", "dirty", "host", "device_kind", "device_count", "versions"} <= set(entry)
    assert entry["versions"]["jax"] == jax.__version__ and entry["versions"]["numpy"] == np.__version__
    assert set(entry["versions"]) == {"python", *driver.PROVENANCE_PACKAGES}
    assert entry["device_count"] == jax.device_count()


class StandInWandb:
    """A stand-in `wandb` module (wandb is not a requirement) that records each run's init arguments and logs."""

    def __init__(self):
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda data, step: run.logged.append((step, data))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_track_logs_each_seed_to_a_wandb_run_of_its_own_and_resume_continues_them(tmp_path, monkeypatch):
    """With --track and 2 seeds: one W&B run per seed, grouped under the run's name, each seed's rows in its own run;
    a --resume (a new Logger) continues the same two runs by their ids, kept in the run directory."""
    wandb = StandInWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    args = spowl.Args(env_id=jax_env.ENV_ID, num_seeds=2, seed=3, track=True, log_dir=str(tmp_path / "run"))
    os.makedirs(args.log_dir)
    for launch, resume_step in enumerate([None, 10]):
        logger = driver.Logger(args, resume_step)
        logger.write([{"global_step": 10 * (launch + 1), "seed": s, "losses/model": float(s)} for s in (3, 4)])
        logger.close()
    first, second = wandb.runs[:2], wandb.runs[2:]
    assert [r.kwargs["name"] for r in first] == ["run/seed_3", "run/seed_4"]
    assert {r.kwargs["group"] for r in wandb.runs} == {"run"} and [r.kwargs["config"]["seed"] for r in first] == [3, 4]
    assert [r.kwargs["id"] for r in second] == [r.kwargs["id"] for r in first]  # the same runs, continued
    assert len({r.kwargs["id"] for r in first}) == 2 and all(r.kwargs["resume"] == "allow" for r in wandb.runs)
    for s, run, resumed in zip((3, 4), first, second):
        assert run.logged == [(10, {"losses/model": float(s)})] and resumed.logged == [(20, {"losses/model": float(s)})]
    assert all(r.finished for r in wandb.runs)


# ---------------------------------------------------------------------------------------------------------------------
# Faults: real processes and real signals (docs/crash-safety.md)

# XLA's CPU backend at optimisation level 1 compiles in about half the time.
def fault_env(tmp_path):  # faulthandler: SIGABRT dumps every thread's Python stack (stderr_when_stopped)
    return {**cached_env(tmp_path), "XLA_FLAGS": "--xla_backend_optimization_level=1", "PYTHONFAULTHANDLER": "1"}


def session_processes(session):
    """Live (not zombie) processes of a session: a trainer started with start_new_session=True, its env workers and
    multiprocessing's resource tracker, wherever they were reparented."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, _, sid = f.read().rsplit(")", 1)[1].split()[:4]
        except OSError:
            continue
        if int(sid) == session and state != "Z":
            pids.append(int(pid))
    return pids


def wait_until(condition, timeout, what, processes=()):
    """Polls `condition` every 2 ms; fails if a process in `processes` ends first or `timeout` s pass."""
    end = time.time() + timeout
    while not condition():
        for p in processes:
            assert p.poll() is None, (what, p.returncode, p.stderr.read()[-3000:])
        assert time.time() < end, f"timed out waiting for {what}"
        time.sleep(0.002)
    return time.time()


def checkpoint_step(run_dir):
    """The step of the run's checkpoint, after reading every array of it (so it is whole)."""
    with np.load(os.path.join(run_dir, "checkpoint.npz")) as data:
        [data[name] for name in data.files]
    return driver.checkpoint_counters(run_dir)["global_step"]


def checkpoint_arrays(run_dir):
    """The runner's arrays in the run's checkpoint, by their pytree paths."""
    with np.load(os.path.join(run_dir, "checkpoint.npz")) as data:
        return {name: data[name] for name in data.files if name not in ("format_version", "counters")}


def assert_same_checkpoint(run_dir, other_dir):
    arrays, others = checkpoint_arrays(run_dir), checkpoint_arrays(other_dir)
    assert len(arrays) > 100 and arrays.keys() == others.keys()
    for name, array in arrays.items():
        np.testing.assert_array_equal(array, others[name], err_msg=name)


def tensorboard_events(path):
    """The events of a TensorBoard event file: TFRecords of a length (8 bytes), its CRC (4), the data, its CRC (4)."""
    from tensorboardX.proto.event_pb2 import Event

    events, data = [], path.read_bytes()
    while data:
        length = int.from_bytes(data[:8], "little")
        events.append(Event.FromString(data[12:12 + length]))
        data = data[16 + length:]
    return events


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# Smaller programs, quicker to compile: no planning, a horizon of 1, one update per vector step.
FAST_FLAGS = [*TINY_FLAGS, "--act", "policy", "--horizon", "1", "--utd-ratio", "0.5"]
# The pure-JAX fault runs plan and switch (Alg. 2) at the default horizon with 2 seeds vmapped, so the resume below must
# restore the planner's warm start and every seed's state.  Their 2 x 150,000-entry buffers make a 46 MB checkpoint,
# whose write takes a while.
# Rounds of 25 vector steps (50 raw steps), so that rows, evaluations and checkpoints fall on the hundreds.
PURE_FAULT_FLAGS = ["--env-id", jax_env.ENV_ID, "--num-seeds", "2", "--num-envs", "2", "--total-timesteps", "500",
                    "--learning-starts", "100", "--log-every", "100", "--eval-every", "300", "--checkpoint-every",
                    "200", "--eval-episodes", "2", "--buffer-size", "150000", "--sync-every", "25", *TINY_FLAGS,
                    "--utd-ratio", "0.5"]


@pytest.fixture(scope="module")
def pure_fault_runs(tmp_path_factory):
    """Six runs on the pure-JAX env, started together and sharing their compiled programs (the same command, or one
    with other intervals), each of 2 seeds that plan and switch, and the faults injected into four of them:

    - reference: runs to the end, with an evaluation at step 300 beside training (no checkpoint there) and one at
      the end;
    - diverging: --lr 1e30 from step 200 on, after a checkpoint of step 200;
    - intervals: rows every 50 steps, evaluations every 250 and checkpoints every 150;
    - killed: kill -9 while checkpoint.npz.tmp of step 400 is being written;
    - terminated: SIGTERM to the trainer alone after the checkpoint of step 200;
    - full disk: a file-size limit (RLIMIT_FSIZE) of 1 MB set on the running trainer after the checkpoint of step 200.

    Returns the run directories, exit codes and (stdout, stderr) by name, and the faults not injected because their
    run ended first (each with its stderr's tail): each test checks one run, so one run's failure shows in its test
    alone.  Under `pytest -n`, the tests that use it share an xdist_group, so the runs start once."""
    tmp_path = tmp_path_factory.mktemp("pure_faults")
    env = fault_env(tmp_path)
    run_dirs = {name: tmp_path / name for name in ["reference", "killed", "terminated", "full_disk", "intervals",
                                                   "diverging"]}
    start = lambda name, *flags: spowl_start(  # noqa: E731
        *PURE_FAULT_FLAGS, *flags, "--log-dir", str(run_dirs[name]), env=env)
    processes, missed = {}, {}
    try:
        processes["reference"] = start("reference")
        processes["diverging"] = start("diverging", "--lr", "1e30", "--learning-starts", "200")
        # Once the reference has compiled (its first row), the others load its programs from the cache.
        wait_until(lambda: (run_dirs["reference"] / "metrics.jsonl").exists(), 600, "the first row",
                   [processes["reference"]])
        for name in ["killed", "terminated", "full_disk"]:
            processes[name] = start(name)
        processes["intervals"] = start("intervals", "--log-every", "50", "--eval-every", "250", "--checkpoint-every",
                                       "150")
        checkpoint = lambda name: run_dirs[name] / "checkpoint.npz"  # noqa: E731
        tmp = lambda name: run_dirs[name] / "checkpoint.npz.tmp"  # noqa: E731
        faults = {  # what to do to whom, once its condition holds
            "killed": (lambda: checkpoint("killed").exists() and tmp("killed").exists(),
                       lambda p: p.kill()),
            "terminated": (lambda: checkpoint("terminated").exists(), lambda p: p.send_signal(signal.SIGTERM)),
            "full_disk": (lambda: checkpoint("full_disk").exists(),
                          lambda p: resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (2 ** 20, 2 ** 20))),
        }
        while faults:
            for name, (condition, inject) in list(faults.items()):
                if condition():
                    inject(processes[name])
                    del faults[name]
                elif processes[name].poll() is not None:  # ended before its fault: its test fails
                    missed[name] = processes[name].stderr.read()[-3000:]
                    del faults[name]
            time.sleep(0.001)
        outputs = {name: p.communicate(timeout=600) for name, p in processes.items()}
    finally:
        for p in processes.values():
            p.kill()
    codes = {name: p.returncode for name, p in processes.items()}
    return types.SimpleNamespace(run_dirs=run_dirs, codes=codes, outputs=outputs, missed=missed, env=env)


def untimed(run_dir):
    return [{k: v for k, v in row.items() if k != "charts/SPS"} for row in read_rows(run_dir)]


@pytest.mark.slow
@pytest.mark.xdist_group("pure_faults")
def test_reference_run_evaluates_beside_training(pure_fault_runs):
    """The evaluation of step 300, with no checkpoint there, ran beside the next rounds and its row came before
    400's; the final one came at the end."""
    runs = pure_fault_runs
    assert runs.codes["reference"] == 0, runs.outputs["reference"][1][-3000:]
    assert [(r["global_step"], r["seed"]) for r in untimed(runs.run_dirs["reference"]) if "eval/return_mean" in r] == [
        (300, 1), (300, 2), (500, 1), (500, 2)]


@pytest.mark.slow
@pytest.mark.xdist_group("pure_faults")
def test_other_intervals_leave_training_unchanged(pure_fault_runs):
    """Rows every 50 steps, evaluations every 250 and checkpoints every 150: the final checkpoint is the reference's,
    array for array (when the driver looks does not change training)."""
    runs = pure_fault_runs
    assert runs.codes["intervals"] == 0, runs.outputs["intervals"][1][-3000:]
    assert runs.codes["reference"] == 0, runs.outputs["reference"][1][-3000:]
    assert checkpoint_step(runs.run_dirs["intervals"]) == 500
    # Rows at the first round boundary past each multiple of 50: after the episode reset at step 400 (a vector step
    # of 0 raw steps) rounds end at 448 and 498, and the run at 500.
    assert {r["global_step"] for r in read_rows(runs.run_dirs["intervals"])} == {*range(50, 401, 50), 498, 500}
    assert_same_checkpoint(runs.run_dirs["reference"], runs.run_dirs["intervals"])


@pytest.mark.slow
@pytest.mark.xdist_group("pure_faults")
def test_kill_9_in_a_checkpoint_write_keeps_the_last_checkpoint_and_resume_gives_the_reference_run(pure_fault_runs):
    """kill -9 while checkpoint.npz.tmp of step 400 is being written: checkpoint.npz stays the one of step 200; the
    rows up to the kill equal the reference's (the same command twice), and after --resume all of them do
    (metrics.jsonl cut back to step 200, then run again): losses, planner diagnostics and evaluations, both seeds;
    and the final checkpoint is the reference's, array for array."""
    runs = pure_fault_runs
    killed = runs.run_dirs["killed"]
    assert "killed" not in runs.missed, runs.missed.get("killed")
    assert runs.codes["reference"] == 0, runs.outputs["reference"][1][-3000:]
    # The temporary file is there, unfinished; the checkpoint is the previous one.
    assert runs.codes["killed"] == -signal.SIGKILL
    assert (killed / "checkpoint.npz.tmp").exists() and checkpoint_step(killed) == 200

    reference_rows, killed_rows = untimed(runs.run_dirs["reference"]), untimed(killed)
    # The kill came after the rows of 400, a row per seed.
    assert [(r["global_step"], r["seed"]) for r in killed_rows] == [(step, seed) for step in (100, 200, 300, 400)
                                                                   for seed in (1, 2)]
    assert killed_rows == reference_rows[:8]  # the same command twice: the same rows
    resumed = subprocess.run([sys.executable, "spowl.py", "--resume", str(killed)], cwd=REPO_DIR, env=runs.env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The JAX env's state is in the checkpoint, so the resumed run is the uninterrupted one, row for row.
    assert untimed(killed) == reference_rows
    # TensorBoard hides the killed launch's events after the checkpoint: in each seed's folder, the resumed launch's
    # event file opens with a session start at step 201, which purges every earlier event of step 201 or later.
    for seed in (1, 2):
        first, second = sorted((killed / f"seed_{seed}").glob("events.out.tfevents.*"), key=os.path.getmtime)
        assert not any(e.HasField("session_log") for e in tensorboard_events(first))
        assert [e.step for e in tensorboard_events(second) if e.session_log.status == e.session_log.START] == [201]
    assert checkpoint_step(killed) == 500 and not (killed / "checkpoint.npz.tmp").exists()
    assert_same_checkpoint(runs.run_dirs["reference"], killed)


@pytest.mark.slow
@pytest.mark.xdist_group("pure_faults")
def test_sigterm_stops_at_a_round_boundary_with_a_checkpoint_and_says_how_to_resume(pure_fault_runs):
    """SIGTERM to the trainer alone after the checkpoint of step 200: it stops at the next round boundary with a
    checkpoint there (that of step 200 if no round began since), exit 128 + 15 and one line saying how to resume."""
    runs = pure_fault_runs
    assert "terminated" not in runs.missed, runs.missed.get("terminated")
    stderr = runs.outputs["terminated"][1]
    assert runs.codes["terminated"] == 128 + signal.SIGTERM, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if "--resume" in line]
    stopped_at = int(line.split("stopped at step ")[1].split()[0])
    assert 200 <= stopped_at <= 400 and checkpoint_step(runs.run_dirs["terminated"]) == stopped_at, line
    assert f"python spowl.py --resume {runs.run_dirs['terminated']}" in line


@pytest.mark.slow
@pytest.mark.xdist_group("pure_faults")
def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(pure_fault_runs):
    """A file-size limit of 1 MB after the checkpoint of step 200: writing the next fails, the run stops with one
    line, the checkpoint of step 200 stays whole and no .tmp is left."""
    runs = pure_fault_runs
    assert "full_disk" not in runs.missed, runs.missed.get("full_disk")
    stderr = runs.outputs["full_disk"][1]
    assert runs.codes["full_disk"] == 1 and "Traceback" not in stderr, stderr[-3000:]
    [line] = error_lines(stderr)
    assert "checkpoint of step 400" in line and "File too large" in line and "step 200 is kept" in line, line
    full_disk = runs.run_dirs["full_disk"]
    assert checkpoint_step(full_disk) == 200 and not (full_disk / "checkpoint.npz.tmp").exists()


@pytest.mark.slow
@pytest.mark.xdist_group("pure_faults")
def test_divergence_stops_naming_the_quantity_and_step_and_keeps_the_last_checkpoint(pure_fault_runs):
    """--lr 1e30 from step 200 on: the run stops at the end of that round naming the first non-finite quantity and
    its step, after the checkpoint of step 200, which is kept; no row after it diverged."""
    runs = pure_fault_runs
    stderr = runs.outputs["diverging"][1]
    assert runs.codes["diverging"] == 1 and "Traceback" not in stderr, stderr[-3000:]
    [line] = error_lines(stderr)
    assert re.search(r" became -?(nan|inf) at step 202 \(seed 1\)", line) and "step 200 is kept" in line, line
    assert checkpoint_step(runs.run_dirs["diverging"]) == 200
    assert max(r["global_step"] for r in read_rows(runs.run_dirs["diverging"])) == 200  # no row after it diverged


SG_FAULT_FLAGS = ["--env-id", SG_ENV, "--num-envs", "1", "--eval-episodes", "1", "--learning-starts", "100",
                  "--log-every", "100", "--eval-every", "100000", "--checkpoint-every", "100", "--buffer-size", "2000",
                  "--total-timesteps", "100000", *FAST_FLAGS, "--utd-ratio", "1"]


def workers(trainer):
    """The trainer's env worker processes (spawned: `spawn_main` in their command line), oldest first: by start time,
    as PIDs wrap around (at 32768 here), and the workers of two vector envs start about a second apart."""
    started = []
    for pid in session_processes(trainer.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
            with open(f"/proc/{pid}/stat") as f:
                start_time = int(f.read().rsplit(")", 1)[1].split()[19])
        except OSError:  # it ended meanwhile
            continue
        if b"spawn_main" in command:
            started.append((start_time, pid))
    return [pid for _, pid in sorted(started)]


def stderr_when_stopped(trainer, timeout):
    """The trainer's stderr once it exits; if it runs on past `timeout` s, fails with every thread's Python stack
    (faulthandler dumps them on SIGABRT, see fault_env) and the processes of its session."""
    try:
        return trainer.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        alive = session_processes(trainer.pid)
        trainer.send_signal(signal.SIGABRT)
        stderr = trainer.communicate(timeout=60)[1]
        pytest.fail(f"still running {timeout} s later; its session's processes {alive}; its stderr:\n{stderr[-12000:]}")


@pytest.fixture(scope="module")
def sg_fault_runs(tmp_path_factory):
    """Four Safety-Gymnasium runs of 1 training and 1 eval env worker, each in a session (process group) of its own,
    running past their first checkpoint, for the tests below to hit, one each: the processes by name, the run
    directory, and how many workers each had at its first checkpoint.  Whatever is still running at the end is
    killed, with its process group."""
    tmp_path = tmp_path_factory.mktemp("sg_faults")
    start = lambda name: spowl_start(  # noqa: E731
        *SG_FAULT_FLAGS, "--log-dir", str(tmp_path / name), env=fault_env(tmp_path), new_session=True)
    checkpointed = lambda name: wait_until(  # noqa: E731
        lambda: (tmp_path / name / "checkpoint.npz").exists(), 600, f"a checkpoint of {name}", [processes[name]])
    processes, worker_counts = {"orphaned": start("orphaned")}, {}
    try:
        # Once the first has checkpointed, its learner's program is in the cache and the others load it.
        checkpointed("orphaned")
        processes.update({name: start(name) for name in ["failing", "interrupted", "aborted"]})
        for name, p in processes.items():
            checkpointed(name)
            worker_counts[name] = len(workers(p))
        yield types.SimpleNamespace(processes=processes, tmp_path=tmp_path, worker_counts=worker_counts)
    finally:
        for p in processes.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.xdist_group("sg_faults")
def test_safety_gymnasium_kill_9_of_the_trainer_leaves_no_worker_behind(sg_fault_runs):
    """kill -9 of the trainer: its workers and the resource tracker exit by themselves within 10 s."""
    assert sg_fault_runs.worker_counts["orphaned"] == 2
    trainer = sg_fault_runs.processes["orphaned"]
    trainer.kill()
    killed_at = time.time()
    trainer.wait()
    gone_at = wait_until(lambda: not session_processes(trainer.pid), 30, "the orphaned workers to exit")
    assert gone_at - killed_at < 10
    assert checkpoint_step(sg_fault_runs.tmp_path / "orphaned") > 0


@pytest.mark.slow
@pytest.mark.xdist_group("sg_faults")
def test_safety_gymnasium_kill_9_of_a_worker_stops_the_run_with_one_line_naming_it(sg_fault_runs):
    """kill -9 of the training env's worker: one line naming it and the cause, every other process exits, the
    checkpoint stays whole."""
    assert sg_fault_runs.worker_counts["failing"] == 2
    trainer = sg_fault_runs.processes["failing"]
    os.kill(workers(trainer)[0], signal.SIGKILL)  # the first one spawned: training env 0
    stderr = stderr_when_stopped(trainer, 120)
    assert trainer.returncode == 1 and len(error_lines(stderr)) == 1, stderr[-3000:]
    [line] = error_lines(stderr)
    assert "training env 0 (env seed 10000) worker was killed by SIGKILL" in line, line
    assert "Traceback" not in stderr, stderr[-3000:]
    wait_until(lambda: not session_processes(trainer.pid), 10, "the other worker to exit")
    assert checkpoint_step(sg_fault_runs.tmp_path / "failing") > 0


@pytest.mark.slow
@pytest.mark.xdist_group("sg_faults")
def test_safety_gymnasium_sigint_to_the_process_group_stops_at_a_round_boundary(sg_fault_runs):
    """SIGINT to the whole process group (Ctrl-C in a terminal): the workers ignore it, the run stops at the round
    boundary with a checkpoint there and one line saying how to resume, and nothing is left."""
    assert sg_fault_runs.worker_counts["interrupted"] == 2
    trainer, run_dir = sg_fault_runs.processes["interrupted"], sg_fault_runs.tmp_path / "interrupted"
    os.killpg(trainer.pid, signal.SIGINT)
    stderr = stderr_when_stopped(trainer, 120)
    assert trainer.returncode == 128 + signal.SIGINT, stderr[-3000:]
    [line] = [line for line in stderr.splitlines() if "--resume" in line]
    stopped_at = int(line.split("stopped at step ")[1].split()[0])
    assert checkpoint_step(run_dir) == stopped_at, line
    assert f"python spowl.py --resume {run_dir}" in line
    assert not session_processes(trainer.pid)


@pytest.mark.slow
@pytest.mark.xdist_group("sg_faults")
def test_safety_gymnasium_a_second_signal_exits_at_once_without_a_checkpoint(sg_fault_runs):
    """SIGTERM, then SIGINT at once (a second signal): exits at once, without a checkpoint or a resume line, its
    workers killed, the previous checkpoint whole."""
    assert sg_fault_runs.worker_counts["aborted"] == 2
    trainer, run_dir = sg_fault_runs.processes["aborted"], sg_fault_runs.tmp_path / "aborted"
    before = checkpoint_step(run_dir)
    # Two different signals, as a second SIGTERM could merge with the first; the kernel may deliver them in either
    # order (both pending: the lower number first), and the second one decides the exit code.
    trainer.send_signal(signal.SIGTERM)
    trainer.send_signal(signal.SIGINT)
    stderr = stderr_when_stopped(trainer, 60)
    assert trainer.returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM), stderr[-3000:]
    first = signal.SIGTERM if trainer.returncode == 128 + signal.SIGINT else signal.SIGINT
    assert f"{first.name}: stopping at the end of this round" in stderr, stderr[-3000:]
    assert "--resume" not in stderr, stderr[-3000:]
    assert checkpoint_step(run_dir) >= before  # whole: the previous one, or one finished before
    wait_until(lambda: not session_processes(trainer.pid), 10, "the aborted run's processes to exit")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, env workers, benchmark.py and the command line


def test_checkpoint_round_trip_and_format_checks(tmp_path):
    runner = {"params": np.arange(6.0).reshape(2, 3), "step": np.array([7], np.int32)}
    driver.save_checkpoint(str(tmp_path), runner, {"next_log": 10, "global_step": 7})
    assert os.listdir(tmp_path) == ["checkpoint.npz"]  # the temporary file was renamed
    restored, counters = driver.load_checkpoint(str(tmp_path), runner)
    assert counters == {"next_log": 10, "global_step": 7}
    np.testing.assert_array_equal(restored["params"], runner["params"])
    with pytest.raises(ValueError, match=re.escape("do not match this code's runner at 1 path(s): ['params']")):
        driver.load_checkpoint(str(tmp_path), {**runner, "params": np.zeros((2, 4))})  # another model size
    with pytest.raises(ValueError, match=re.escape("at 1 path(s): ['more']")):  # new state: named, no version bump
        driver.load_checkpoint(str(tmp_path), {**runner, "more": np.zeros(1)})
    with open(tmp_path / "checkpoint.npz", "wb") as f:  # as the code before format versions wrote it
        np.savez(f, *runner.values(), counters=json.dumps(counters))
    with pytest.raises(ValueError, match="format version none"):
        driver.checkpoint_counters(str(tmp_path))
    (tmp_path / "checkpoint.npz").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        driver.checkpoint_counters(str(tmp_path))


class Exploding(envs.gymnasium.Env):
    """A stand-in for a MuJoCo env that raises on its second step (if `explode`)."""

    observation_space = envs.gymnasium.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = envs.gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def __init__(self, explode):
        self.explode, self.steps = explode, 0

    def reset(self, *, seed=None, options=None):
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.steps += 1
        if self.explode and self.steps == 2:
            raise ValueError("MuJoCo Warning: Nan, Inf or huge value in QACC")
        return np.zeros(3, np.float32), 0.0, False, False, {}


def test_benchmark_runs_at_a_tiny_size_checkpoint_included(capsys, monkeypatch, tmp_path, tiny):
    """benchmark.py's code path as `python benchmark.py` runs it, at a tiny size: the checkpoint write (over its
    stand-in Safety-Gymnasium env, whose shapes `init` traces a round of acting with), the planning call, the update
    and the raw env; not the training loop, whose driver functions the run tests play."""
    # The training loop is left out as compiling a run's programs takes about 25 s on 2 cores.
    monkeypatch.chdir(tmp_path)  # the checkpoint is written in a temporary directory under the working directory
    args = dataclasses.replace(tiny, env_id="SafetyPointGoal1-v0", num_envs=1, eval_episodes=1, buffer_size=1_000)
    benchmark.main(args, repeats=1, env_steps=2, loop_steps=0)
    printed = capsys.readouterr().out
    for step in ["checkpoint (1,000-transition buffer)", "planning call", "gradient update", "raw vector env alone"]:
        assert step in printed, printed


def test_a_worker_that_raises_is_named_and_the_others_are_stopped():
    workers = envs.Workers([functools.partial(Exploding, explode=i == 1) for i in range(3)], "eval", [7, 8, 9])
    try:
        workers.reset()
        workers.step(np.zeros((3, 2), np.float32))
        with pytest.raises(envs.WorkerFailed, match=r"^eval env 1 \(env seed 8\) worker raised ValueError: MuJoCo"):
            workers.step(np.zeros((3, 2), np.float32))
        assert workers.failure.startswith("eval env 1")
    finally:
        workers.close(terminate=True)
    assert not any(process.is_alive() for process in workers.processes)


@pytest.fixture
def bad_runs(tmp_path):
    """Run directories that cannot be resumed, under tmp_path: old_format, whose checkpoint has no format version;
    truncated, whose checkpoint was cut short; bad_config, whose config.json is broken."""
    old_format = tmp_path / "old_format"  # a run directory whose checkpoint has no format version
    old_format.mkdir()
    (old_format / "config.json").write_text(json.dumps(dataclasses.asdict(spowl.Args(env_id=jax_env.ENV_ID))))
    np.savez(old_format / "checkpoint.npz", np.zeros(3), counters="{}")
    truncated, bad_config = tmp_path / "truncated", tmp_path / "bad_config"  # a checkpoint cut short; a broken config
    for run in (truncated, bad_config):
        run.mkdir()
        (run / "config.json").write_text((old_format / "config.json").read_text())
    driver.save_checkpoint(str(truncated), {"x": np.arange(1000.0)}, {})
    (truncated / "checkpoint.npz").write_bytes((truncated / "checkpoint.npz").read_bytes()[:500])
    (bad_config / "config.json").write_text('{"env_id": "JaxPointGoal1-v0", "no_such_flag": 1}')
    return tmp_path


# Bad flags and the text their error must hold; {tmp} stands for the test's tmp_path, which holds `bad_runs`.
BAD_FLAGS = {
    "env-id": (["--env-id", "SafetyPointGoal1Vision-v0"], "--env-id"),
    "num-envs": (["--num-envs", "0"], "--num-envs"),
    "total-timesteps": (["--total-timesteps", "-5"], "--total-timesteps"),
    "num-elites": (["--num-elites", "600"], "--num-elites"),
    "horizon": (["--horizon", "0"], "--horizon"),
    "max-env-workers": (["--num-seeds", "3", "--max-env-workers", "50"], "--max-env-workers"),
    "resume-missing": (["--resume", "{tmp}/missing"], "--resume"),
    "resume-old-format": (["--resume", "{tmp}/old_format", "--log-dir", "{tmp}/old_format"], "format version"),
    "ci-thresholds": (["--ci-thresholds", "--switch-rule", "mean"], "--ci-thresholds"),
    "cost-gamma": (["--cost-gamma", "1.5"], "--cost-gamma must be in (0, 1]"),
    "tau": (["--tau", "0"], "--tau must be in (0, 1]"),
    "dropout": (["--dropout", "1"], "--dropout must be in [0, 1)"),
    "episode-cost-limit": (["--episode-cost-limit", "-1"], "--episode-cost-limit must not be negative"),
    "multiplier-lr": (["--multiplier-lr", "-1e-6"], "--multiplier-lr must not be negative"),
    "cost-tau": (["--cost-tau", "0"], "--cost-tau must be in (0, 1]"),
    "lagrange-init": (["--lagrange-init", "0.5", "--lagrange-max", "0.1"], "--lagrange-init (0.5) must not exceed"),
    "penalty-init": (["--penalty-init", "2", "--penalty-max", "1"], "--penalty-init (2.0) must not exceed"),
    "resume-truncated": (["--resume", "{tmp}/truncated"], "cannot read {tmp}/truncated/checkpoint.npz (BadZipFile"),
    "resume-bad-config": (["--resume", "{tmp}/bad_config"], "cannot read {tmp}/bad_config/config.json"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_input_is_refused_before_anything_starts(bad_runs, case):
    """Each bad flag raises a ValueError naming it, from the config alone (`driver.configure`, which `main` turns into
    one line: see the next test), and nothing is written."""
    flags, name = BAD_FLAGS[case]
    flags, name = [f.format(tmp=bad_runs) for f in flags], name.format(tmp=bad_runs)
    if "--log-dir" not in flags and "--resume" not in flags:
        flags = [*flags, "--log-dir", str(bad_runs / "new")]
    with pytest.raises(ValueError, match=re.escape(name)):
        driver.configure(spowl.PRESETS, spowl.check, flags)
    assert sorted(os.listdir(bad_runs)) == ["bad_config", "old_format", "truncated"]  # nothing started
    assert len(os.listdir(bad_runs / "old_format")) == 2


@pytest.mark.parametrize("flags, name", [(["--env-id", "Foo-v0"], "--env-id"),
                                         (["--log-dir", "{existing}"], "--log-dir"),
                                         (["--env-id", "JaxPointGoal1-v0", "--capture-video"], "--capture-video")],
                         ids=["env-id", "log-dir", "capture-video"])
def test_bad_input_fails_fast_with_a_one_line_error(tmp_path, flags, name):
    """As a script: exit non-zero with one `error:` line naming the flag, no traceback, and an existing run left as it
    was."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("keep me\n")
    flags = [f.format(existing=existing) for f in flags]
    result = spowl_cli(*flags, "--log-dir", str(tmp_path / "new"), timeout=120) if "--log-dir" not in flags \
        else spowl_cli(*flags, timeout=120)
    assert result.returncode != 0, flags
    assert "Traceback" not in result.stderr, result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and name in message[0], (flags, result.stderr[-2000:])
    assert not (tmp_path / "new").exists()  # nothing started
    assert (existing / "metrics.jsonl").read_text() == "keep me\n"


def test_tdmpc2_alone_is_the_plan_only_baseline_and_resumes_as_such(tmp_path):
    """Left out, --act is the switch, or plan under --planner tdmpc2; an explicit --act wins.  The resolved value is
    the one the run directory's config.json holds, so --resume keeps it."""
    def prepare(**fields):
        args = spowl.Args(env_id=jax_env.ENV_ID, log_dir=str(tmp_path / "new"), **fields)
        return driver.prepare_run(args, set(fields) | {"env_id", "log_dir"}, spowl.check)[0]

    assert prepare().act == "switch" and prepare(planner="cce").act == "switch"
    assert prepare(planner="tdmpc2", act="switch").act == "switch"
    baseline = prepare(planner="tdmpc2")
    assert baseline.act == "plan"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(baseline)))  # as `train` writes it
    np.savez(run / "checkpoint.npz", format_version=driver.CHECKPOINT_FORMAT, counters="{}")  # a resumable run
    resumed, resuming = driver.prepare_run(spowl.Args(resume=str(run), planner="tdmpc2"), {"resume", "planner"},
                                           spowl.check)
    assert resuming and resumed.act == "plan"


# ---------------------------------------------------------------------------------------------------------------------
# The training loop


@pytest.mark.slow
def test_rounds_side_by_side_in_turn_split_anywhere_and_as_one_program_give_the_same_run(tiny):
    """A run's rounds played three ways give the same runner, bit for bit, across random steps, planning + gradient
    updates and an episode reset: the driver's actor and learner side by side on two threads; the same rounds in
    turn; side by side again but stopped and continued at other global steps, as rows, evaluations and checkpoints
    stop the driver (so their intervals leave training unchanged).  `train.run`, the whole run as one XLA program
    (PureJaxRL-style), gives the rounds in turn up to float32 rounding.  Adam's step count shows each learning step's
    updates made exactly once, the last round's by the final settle.  Side by side, the actor plays the random phase
    without waiting for a busy learner."""
    # 440 raw steps = 221 vector steps of 2 envs: the envs truncate at agent step 200 and the next step only resets
    # them (0 raw steps).  Rounds of 16 vector steps, the last one gated off at the end.
    end, sync_every = 440, 16
    args = dataclasses.replace(tiny, env_id=jax_env.ENV_ID, num_envs=2, utd_ratio=1.5, learning_starts=100,
                               buffer_size=1000, total_timesteps=end, eval_episodes=2, sync_every=sync_every)
    env, eval_env, _ = envs.make_envs(args)
    fns = spowl.make_train(args, env, eval_env)
    keys = jax.random.PRNGKey(0)[None]  # one seed
    train, _ = driver.jit_over_seeds(fns, driver.seed_mesh(1), keys)
    start = train.init(keys)
    copy = lambda runner: jax.tree.map(jnp.copy, runner)  # noqa: E731  (the actor's state is donated)

    # The learner is kept busy, as while its program compiles, until the actor has played a round with learning
    # steps: the random phase's rounds, which leave the agent as it is, must not wait for it.
    learning_began = threading.Event()

    def collect(actor, agent, stop_at):
        actor, rollout, metrics = train.collect(actor, agent, stop_at)
        if np.asarray(rollout.learning).any():
            learning_began.set()
        return actor, rollout, metrics

    rounds = []
    with driver.ThreadPoolExecutor(1) as learner:
        busy = learner.submit(learning_began.wait, 120)
        side_by_side = driver.play(train._replace(collect=collect), copy(start), end, end, learner, rounds.append)
        assert busy.result(), "the actor waited for the learner in the random phase"
        split_up = copy(start)
        for until in (30, 100, 101, 250, end):  # inside rounds, at the first learning step, one round apart
            split_up = driver.play(train, split_up, until, end, learner)
    in_turn = driver.play(train, copy(start), end, end)
    (side_by_side, metrics), (split_up, _), (in_turn, _) = (driver.settle(train, r) for r in (side_by_side, split_up,
                                                                                              in_turn))
    for other in (split_up, in_turn):
        for a, b in zip(jax.tree.leaves(side_by_side), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # `train.run`: the same rounds as one XLA program. XLA fuses a round inside the program's while loop otherwise than
    # as a program of its own, so from the first update on the two differ by float32 rounding (jax 0.12.1 CPU: ~1e-8
    # after 16 learning steps; bit for bit on jax 0.6.2), which training's chaos grows to ~0.03 by step 440. So they
    # are compared 16 learning steps in, where one update more or less would show: integers exactly, floats to 1e-6.
    short = 132
    fns_short = spowl.make_train(dataclasses.replace(args, total_timesteps=short), env, eval_env)
    train_short, _ = driver.jit_over_seeds(fns_short, driver.seed_mesh(1), keys)
    in_turn_short, _ = driver.settle(train_short, driver.play(train_short, train_short.init(keys), short, short))
    one_program, _ = jax.jit(fns_short.run)(keys)
    assert int(one_program.actor.global_step[0]) == short
    for a, b in zip(jax.tree.leaves(in_turn_short), jax.tree.leaves(one_program), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)

    acted = {name: np.concatenate([np.asarray(r["act"][name]) for r in rounds]) for name in rounds[0]["act"]}
    active = acted["active"][:, 0]
    assert int(side_by_side.actor.global_step[0]) == end and len(rounds) == -(-active.sum() // sync_every)
    learning = acted["learning"][active, 0]
    assert learning.any() and not learning.all()  # random steps, then planning and updates
    assert acted["ended"][active].any()  # an episode end (and the reset after it)
    assert {"elites", "no_improvement", "d_reward", "d_cost", "q_low", "qc_high"} <= set(acted)
    assert {"value", "multiplier", "updated", "model_loss"} <= set(rounds[-1]["update"]) <= set(metrics)
    adam = side_by_side.agent.model_opt[0][1][0]  # chain(flatten(chain(clip, adam)), masked scale): adam's state
    assert int(adam.count[0]) == 3 * learning.sum()  # num_envs x utd_ratio per learning step
    assert int(side_by_side.buffer.size[0]) == active.sum() + 1  # every transition stored, after the first obs


# ---------------------------------------------------------------------------------------------------------------------
# The report: Table 1 and learning curves from run directories


def write_run(run_dir, rows, **config):
    """A synthetic run directory: config.json from spowl.Args with `config`, and metrics.jsonl from `rows`."""
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(spowl.Args(log_dir=str(run_dir), **config)), f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def seed_rows(seed, final_return, final_cost, cost_rate, steps=4000):
    """Log rows every 1000 steps and evals every 2000 (the last eval's return and cost given), for one seed."""
    rows = []
    for step in range(1000, steps + 1, 1000):
        row = {"global_step": step, "seed": seed, "train/cost_rate": cost_rate if step == steps else 1.0,
               "train/episode_cost": 10.0 * seed, "lagrange/lambda": step / 1000}
        if step % 2000 == 0:
            last = step == steps
            row.update({"eval/return_mean": final_return if last else 0.0, "eval/return_std": 1.0,
                        "eval/cost_mean": final_cost if last else 9.0, "eval/cost_std": 1.0})
        rows.append(row)
    return rows


def report_cli(*flags):
    """report.py's main, in this process (a subprocess would import JAX and matplotlib again)."""
    argv = sys.argv
    sys.argv = ["report.py", *flags]
    try:
        report.main()
    finally:
        sys.argv = argv


def test_report_table_groups_duplicates_broken_dirs_and_figures(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    task = "SafetyPointGoal1-v0"
    # SPOWL in the paper's setting: seeds 1-2 in one --num-seeds run, seed 3 in a run with other intervals and budget
    # (the same group), and seed 3 again in a shorter run (dropped: fewer steps).
    write_run(runs / "spowl_12", seed_rows(1, 20.0, 1.0, 0.01) + seed_rows(2, 24.0, 2.0, 0.02), env_id=task,
              num_seeds=2)
    write_run(runs / "more" / "spowl_3", seed_rows(3, 22.0, 3.0, 0.03, steps=6000), env_id=task, seed=3,
              eval_every=2000, total_timesteps=6000)
    write_run(runs / "spowl_3_short", seed_rows(3, 99.0, 99.0, 0.99, steps=2000), env_id=task, seed=3)
    write_run(runs / "tdmpc2", seed_rows(1, 25.0, 50.0, 0.05), env_id=task, planner="tdmpc2", act="plan")
    write_run(runs / "spowl_lr", seed_rows(1, 10.0, 4.0, 0.04), env_id=task, lr=1e-3)
    write_run(runs / "broken", seed_rows(1, 0.0, 0.0, 0.0), env_id=task)
    (runs / "broken" / "config.json").write_text("{not json")
    before = sorted(str(p) for p in runs.rglob("*"))

    out = tmp_path / "out"
    figures, close = [], report.plt.close  # the figures report.py draws, kept open to read back what they show
    monkeypatch.setattr(report.plt, "close", figures.append)
    report_cli(str(runs), "--out", str(out))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, warnings
    assert "broken" in warnings[0] and "seed 3" in warnings[1] and "spowl_3_short" in warnings[1]
    assert sorted(str(p) for p in runs.rglob("*")) == before  # nothing written into a run directory

    groups = report.group_seeds(report.load_seeds([str(runs)]))
    assert [(g.mode, g.flags, [s.seed for s in g.seeds]) for g in groups] == [
        ("SPOWL", (), [1, 2, 3]), ("SPOWL", ("--lr 0.001",), [1]), ("TD-MPC2", (), [1])]
    (r, c, rho, recent), steps, speed = report.summarize(groups[0])
    # By hand: R 20, 24, 22 -> 22 +- sqrt(8/3); C 1, 2, 3 -> 2 +- sqrt(2/3); rho 100, 200, 300 -> 200 +- sqrt(20000/3),
    # and the same over the last 20,000 steps, as no run is longer.
    np.testing.assert_allclose([r, c, rho, recent], [[22, np.sqrt(8 / 3)], [2, np.sqrt(2 / 3)],
                                                     [200, np.sqrt(20000 / 3)], [200, np.sqrt(20000 / 3)]])
    assert steps == 4000 and speed is None  # the minimum over seeds; no charts/SPS logged
    table = (out / "table.md").read_text()
    assert (f"| {task} | SPOWL [a] | 22.0 ± 1.6 | 26.9 ± 0.4 | 2.0 ± 0.8 | 1.5 ± 1.1 | 200 ± 82 | 133 | 200 ± 82 | 3 | "
            f"4,000 | – |") in table
    assert (f"| {task} | TD-MPC2 [a] | 25.0 ± 0.0 | 27.5 | 50.0 ± 0.0 | 52.3 | 500 ± 0 | 515 | 500 ± 0 | 1 | 4,000 | "
            f"– |") in table
    assert f"| {task} | SPOWL [b] | 10.0 ± 0.0 | 26.9 ± 0.4 |" in table
    assert "- [b] `--lr 0.001`" in table and "broken" not in table
    # The figure: per group, the mean over seeds at the eval steps all its seeds share (2000 and 4000: seed 3's run
    # evaluated at 0.0 return and 9.0 cost at 4000 and finished at 6000), and the paper's values dashed, once per
    # method.
    figure, cost_figure = figures
    assert (out / f"{task}.png").stat().st_size > 10_000
    for ax, k, ylabel in zip(figure.axes, (0, 1), ("eval return per episode", "eval cost per episode")):
        assert ax.get_xlabel() == "raw env steps" and ax.get_ylabel() == ylabel
        lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
        expected = {"SPOWL [a], 3 seeds": [[0.0, 44 / 3], [9.0, 4.0]], "SPOWL [b], 1 seed": [[0.0, 10.0], [9.0, 4.0]],
                    "TD-MPC2 [a], 1 seed": [[0.0, 25.0], [9.0, 50.0]]}
        paper = {"SPOWL, paper at 5M steps": [26.9, 1.5], "TD-MPC2, paper at 5M steps": [27.5, 52.3]}
        assert set(lines) == set(expected) | set(paper)
        for label, values in expected.items():
            assert lines[label][0] == [2000, 4000], label
            np.testing.assert_allclose(lines[label][1], values[k], err_msg=label)
        for label, values in paper.items():
            np.testing.assert_allclose(lines[label][1], values[k], err_msg=label)
    close(figure)
    # The cost-and-multiplier figure: training cost per episode for every group, lambda for the safe ones only, at the
    # log steps all seeds share (1000-4000).
    assert (out / f"{task}-cost-lambda.png").stat().st_size > 10_000
    costs, multipliers = ({line.get_label(): list(line.get_ydata()) for line in ax.lines} for ax in cost_figure.axes)
    assert costs == {"SPOWL [a], 3 seeds": [20.0] * 4, "SPOWL [b], 1 seed": [10.0] * 4, "TD-MPC2 [a], 1 seed": [10.0] * 4}
    assert multipliers == {"SPOWL [a], 3 seeds": [1.0, 2.0, 3.0, 4.0], "SPOWL [b], 1 seed": [1.0, 2.0, 3.0, 4.0]}
    assert cost_figure.axes[1].get_yscale() == "log"
    close(cost_figure)


def test_recent_cost_rate_is_the_cost_over_the_last_20k_steps():
    """The table's recent training cost rate: from the cumulative rates of the last row and of the last row at least
    20,000 steps before it."""
    rows = [{"global_step": step, "train/cost_rate": rate, "eval/return_mean": 1.0, "eval/cost_mean": 2.0}
            for step, rate in [(5_000, 0.1), (10_000, 0.05), (15_000, 0.04), (30_000, 0.03)]]
    record = report.Seed("run", 1, {}, rows, [])
    # Cumulative costs: 500 at 10,000 (the last row 20,000 steps back), 900 at 30,000 -> 400 / 20,000.
    np.testing.assert_allclose(report.final_values(record), [1.0, 2.0, 300.0, 200.0])


def test_results_md_is_what_report_writes_from_the_committed_runs(monkeypatch):
    """results/RESULTS.md is the page that the command at its top writes from the committed runs (figures aside)."""
    monkeypatch.chdir(REPO_DIR)
    with open(os.path.join("results", "RESULTS.md")) as f:
        committed = f.read()
    command = re.search(r"`(python report\.py [^`]*)`", committed.splitlines()[0]).group(1)
    args = tyro.cli(report.Args, args=shlex.split(command)[2:])
    assert report.render_page(report.group_seeds(report.load_seeds(args.paths)), args) == committed


def test_the_small_preset_is_an_optional_first_word(tmp_path):
    """`python spowl.py small ...` starts from the small sizes, with later flags on top; without the word the paper's
    defaults hold, so `python spowl.py --env-id ...` is unchanged."""
    log_dir = ["--log-dir", str(tmp_path / "run")]
    small, _ = driver.configure(spowl.PRESETS, spowl.check,
                                ["small", "--env-id", jax_env.ENV_ID, "--seed", "7", *log_dir])
    paper, _ = driver.configure(spowl.PRESETS, spowl.check, ["--env-id", jax_env.ENV_ID, *log_dir])
    expected = dataclasses.replace(spowl.PRESETS["small"][1], env_id=jax_env.ENV_ID, seed=7, act="switch",
                                   log_dir=log_dir[1])
    assert small == expected and small.latent_dim == 64 and small.num_envs == 2
    assert paper == dataclasses.replace(spowl.Args(), env_id=jax_env.ENV_ID, act="switch", log_dir=log_dir[1])


def test_the_driver_imports_no_part_of_the_algorithm():
    """driver.py works on the config and the functions make_train returns: importing it loads none of the algorithm's
    modules, so a fork changes the method without touching the driver."""
    code = "import sys, driver; print(sorted({'spowl', 'planner', 'policy', 'world_model'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "[]", output
