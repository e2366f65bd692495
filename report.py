"""Table 1 and learning curves from SPOWL run directories.

    python report.py runs/ --out report/        # report/table.md and one figure per task
    python report.py results --out results --page RESULTS.md --intro results/intro.md   # regenerates RESULTS.md

A run directory is any directory holding `config.json` and `metrics.jsonl` (searched recursively under the given
paths); one written with `--num-seeds N` holds N seeds, told apart by the `seed` key of its rows.  Seeds are grouped
into methods by their config, Table 1 gives each method's final eval return R, eval cost C and training cost rate
rho (mean +- std over seeds) beside the paper's, and one figure per task draws the eval curves.  Nothing is written
into a run directory.
"""

import dataclasses
import json
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Optional

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tyro  # noqa: E402

import driver  # noqa: E402
import planner  # noqa: E402
import spowl  # noqa: E402


@dataclass(frozen=True)
class Args:
    paths: tyro.conf.Positional[tuple[str, ...]]
    """run directories, or folders searched recursively for them"""
    out: str = "."
    """folder that receives the page and the figures"""
    page: str = "table.md"
    """file name of the Markdown page written into --out"""
    intro: Optional[str] = None
    """a Markdown file whose text opens the page (what the runs are, how they were made)"""


# The paper's Table 1 (5M raw steps, mean +- std over seeds): (R, R std, C, C std, rho x 1e4) per task and method.
# The unsafe TD-MPC2 column reports no std (None).
PAPER_TABLE_1 = {
    "SafetyPointGoal1-v0": {"SPOWL": (26.9, 0.4, 1.5, 1.1, 133), "TD-MPC2": (27.5, None, 52.3, None, 515)},
    "SafetyPointGoal2-v0": {"SPOWL": (13.7, 3.2, 4.8, 1.2, 280), "TD-MPC2": (27.4, None, 179.0, None, 1641)},
    "SafetyPointPush1-v0": {"SPOWL": (18.7, 1.4, 1.8, 2.5, 103), "TD-MPC2": (20.8, None, 34.2, None, 353)},
    "SafetyPointButton1-v0": {"SPOWL": (10.0, 1.5, 5.4, 2.7, 269), "TD-MPC2": (33.4, None, 103.3, None, 1219)},
    "SafetyCarGoal1-v0": {"SPOWL": (31.3, 0.8, 1.0, 1.0, 113), "TD-MPC2": (34.8, None, 51.2, None, 563)},
    "SafetyDoggoGoal1-v0": {"SPOWL": (19.0, 1.9, 0.3, 0.4, 286), "TD-MPC2": (27.9, None, 72.6, None, 659)},
    "SafetyAntGoal1-v0": {"SPOWL": (38.9, 1.4, 2.0, 0.2, 275), "TD-MPC2": (61.0, None, 70.9, None, 682)},
}
PAPER_STEPS = 5_000_000

# Config fields that do not change the method: the seed, where the run lives, how long it ran, and how often and where
# it logged.  Seeds that agree on every other field form one group.
NON_METHOD_FIELDS = {"seed", "num_seeds", "log_dir", "resume", "total_timesteps", "log_every", "eval_every",
                     "checkpoint_every", "track", "wandb_project", "capture_video", "progress_bar"}

# Each planner's name in the paper, and the acting mode the paper runs it with.
PLANNER_NAMES = {"spowl": "SPOWL", "tdmpc2": "TD-MPC2", "cce": "CCE"}
PAPER_ACT = {"spowl": "switch", "tdmpc2": "plan", "cce": "switch"}


def main():
    args = tyro.cli(Args)
    groups = group_seeds(load_seeds(args.paths))
    if not groups:
        raise SystemExit(f"error: no run directory (config.json + metrics.jsonl) under {' '.join(args.paths) or '.'}")
    os.makedirs(args.out, exist_ok=True)
    labels = setting_labels(groups)
    for env_id, task_groups in by_task(groups):
        plot_task(env_id, task_groups, labels, args.out)
        plot_cost_and_multiplier(env_id, task_groups, labels, args.out)
    with open(os.path.join(args.out, args.page), "w") as f:
        f.write(render_page(groups, args))


def command_line(args):
    """The command that writes this report (the options left at their defaults left out)."""
    options = [("--out", args.out, "."), ("--page", args.page, "table.md"), ("--intro", args.intro, None)]
    return shlex.join(["python", "report.py", *args.paths,
                       *[word for name, value, default in options if value != default for word in (name, value)]])


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# Reading run directories


@dataclass(frozen=True)
class Seed:
    """One seed's record in one run directory."""
    run_dir: str
    seed: int
    config: dict  # the run's config.json, with the current defaults for fields it predates
    rows: list  # this seed's metrics.jsonl rows, in order
    provenance: list  # the run's provenance.jsonl entries, one per launch

    @property
    def steps(self):
        return max(row["global_step"] for row in self.rows)


def find_run_dirs(paths):
    """Every directory under `paths` (themselves included) that holds config.json and metrics.jsonl, sorted."""
    found = set()
    for path in paths:
        for folder, _, files in os.walk(path):
            if "config.json" in files and "metrics.jsonl" in files:
                found.add(os.path.normpath(folder))
    return sorted(found)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_run(run_dir):
    """The seeds of one run directory.  Raises ValueError (or OSError) where it does not parse."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = {**dataclasses.asdict(spowl.Args()), **json.load(f)}
    # A left-out --act resolves by the planner, as spowl.py resolves it before it writes config.json.
    config["act"] = spowl.check(spowl.Args(planner=config["planner"], act=config["act"])).act
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    provenance_path = os.path.join(run_dir, "provenance.jsonl")
    provenance = read_jsonl(provenance_path) if os.path.isfile(provenance_path) else []
    if not rows or not all(isinstance(row, dict) and "global_step" in row for row in rows):
        raise ValueError("metrics.jsonl is empty or has rows without a global_step")
    seeds = sorted({row.get("seed", config["seed"]) for row in rows})
    result = []
    for seed in seeds:
        seed_rows = [row for row in rows if row.get("seed", config["seed"]) == seed]
        for key in ["eval/return_mean", "train/cost_rate"]:
            if not any(key in row for row in seed_rows):
                raise ValueError(f"seed {seed} has no {key} yet")
        result.append(Seed(run_dir, seed, config, seed_rows, provenance))
    return result


def load_seeds(paths):
    """All seeds of all run directories under `paths`; a directory that does not parse is skipped with a warning."""
    seeds = []
    for run_dir in find_run_dirs(paths):
        try:
            seeds += read_run(run_dir)
        except (OSError, ValueError, KeyError, TypeError) as error:
            warn(f"skipping {run_dir}: {type(error).__name__}: {error}")
    return seeds


# ---------------------------------------------------------------------------------------------------------------------
# Grouping seeds into methods


@dataclass
class Group:
    """The seeds of one method on one task."""
    env_id: str
    mode: str  # the paper's name of the planner, with the acting mode where it is not the paper's
    planner: str
    flags: tuple  # kebab-case flags that differ from the paper's setting, planner and act aside
    seeds: list


def method_config(config):
    return {name: value for name, value in config.items() if name not in NON_METHOD_FIELDS}


def mode_name(config):
    """SPOWL, TD-MPC2 or CCE, by the resolved planner; the acting mode is added where it is not the paper's."""
    name = PLANNER_NAMES.get(config["planner"], config["planner"])
    return name if config["act"] == PAPER_ACT.get(config["planner"]) else f"{name} (act {config['act']})"


def format_flag(name, value):
    flag = driver.flag(name)
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def differing_flags(config):
    """The method's flags whose values differ from `spowl.Args()`, the paper's setting (planner and act aside)."""
    defaults = dataclasses.asdict(spowl.Args())
    return tuple(format_flag(name, value) for name, value in method_config(config).items()
                 if name not in ("env_id", "planner", "act") and value != defaults.get(name))


def keep_longest(seeds):
    """One record per seed: where two directories hold the same seed, the one that ran more steps (with a warning)."""
    kept = {}
    for record in seeds:
        other = kept.get(record.seed)
        if other is not None:
            longer, shorter = (record, other) if record.steps > other.steps else (other, record)
            warn(f"seed {record.seed} is in both {other.run_dir} and {record.run_dir}: keeping {longer.run_dir} "
                 f"({longer.steps} steps, against {shorter.steps})")
            record = longer
        kept[record.seed] = record
    return [kept[seed] for seed in sorted(kept)]


def group_seeds(seeds):
    """Groups of seeds that agree on env id and every method field, in Table 1's task order, then SPOWL, TD-MPC2,
    CCE."""
    buckets = {}
    for record in seeds:
        key = tuple(sorted(method_config(record.config).items(), key=lambda item: item[0]))
        buckets.setdefault(key, []).append(record)
    groups = []
    for records in buckets.values():
        config = records[0].config
        groups.append(Group(config["env_id"], mode_name(config), config["planner"], differing_flags(config),
                            keep_longest(records)))
    tasks, planners = list(PAPER_TABLE_1), list(PLANNER_NAMES)
    return sorted(groups, key=lambda g: (tasks.index(g.env_id) if g.env_id in tasks else len(tasks), g.env_id,
                                         planners.index(g.planner) if g.planner in planners else len(planners),
                                         g.mode, g.flags))


def by_task(groups):
    """(env_id, its groups) in the groups' order."""
    tasks = {}
    for group in groups:
        tasks.setdefault(group.env_id, []).append(group)
    return list(tasks.items())


# ---------------------------------------------------------------------------------------------------------------------
# Table 1


RECENT_STEPS = 20_000  # the window of the recent training cost rate


def final_values(record):
    """(R, C, rho x 1e4, recent rho x 1e4) of one seed: its last eval row's return and cost, its last training cost
    rate, and its training cost rate over the last RECENT_STEPS raw steps, from the cumulative rates of its last row
    and of its last row that far back (the whole run if it is shorter)."""
    last_eval = max((row for row in record.rows if "eval/return_mean" in row), key=lambda row: row["global_step"])
    rated = sorted((row["global_step"], row["train/cost_rate"]) for row in record.rows if "train/cost_rate" in row)
    end, rate = rated[-1]
    start, start_rate = max([(0, 0.0)] + [(step, r) for step, r in rated if step <= end - RECENT_STEPS])
    recent = (rate * end - start_rate * start) / (end - start)
    return last_eval["eval/return_mean"], last_eval["eval/cost_mean"], rate * 1e4, recent * 1e4


def summarize(group):
    """Mean and population std over seeds (as `eval/*_std` over episodes) of R, C, rho x 1e4 and the recent rho x 1e4,
    as a (4, 2) array; the raw steps every seed reached; the median training speed in raw env steps/s per seed (None
    if unlogged)."""
    values = np.array([final_values(record) for record in group.seeds])  # (seeds, 4)
    speeds = [row["charts/SPS"] for record in group.seeds for row in record.rows if "charts/SPS" in row]
    return (np.stack([values.mean(0), values.std(0)], axis=1), min(record.steps for record in group.seeds),
            float(np.median(speeds)) if speeds else None)


def paper_values(group):
    """The paper's (R, R std, C, C std, rho) for this group's task and planner, or None."""
    if group.mode not in PLANNER_NAMES.values():
        return None
    return PAPER_TABLE_1.get(group.env_id, {}).get(group.mode)


def mean_std(mean, std, digits):
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def setting_labels(groups):
    """A letter for each distinct set of flags that differ from the paper's setting, in order of appearance."""
    labels = {}
    for group in groups:
        labels.setdefault(group.flags, "abcdefghijklmnopqrstuvwxyz"[len(labels)])
    return labels


def group_label(group, labels):
    return f"{group.mode} [{labels[group.flags]}]"


def render_table(groups, labels):
    """Table 1 in Markdown: one row per (task, group), ours beside the paper's."""
    lines = ["| task | method | R | R paper | C | C paper | ρ·10⁴ | ρ·10⁴ paper | ρ·10⁴ last 20k | seeds | steps | "
             "steps/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for group in groups:
        (r, c, rho, recent), steps, speed = summarize(group)
        paper = paper_values(group)
        paper_cells = ["–"] * 3 if paper is None else [mean_std(paper[0], paper[1], 1), mean_std(paper[2], paper[3], 1),
                                                        f"{paper[4]}"]
        lines.append(f"| {group.env_id} | {group_label(group, labels)} | {mean_std(*r, 1)} | {paper_cells[0]} | "
                     f"{mean_std(*c, 1)} | {paper_cells[1]} | {mean_std(*rho, 0)} | {paper_cells[2]} | "
                     f"{mean_std(*recent, 0)} | {len(group.seeds)} | {steps:,} | {'–' if speed is None else f'{speed:.0f}'} |")
    return "\n".join(lines)


def render_settings(labels):
    lines = ["Flags that differ from the paper's setting (the defaults of `spowl.Args`; planner and act are in the "
             "method's name):", ""]
    for flags, label in labels.items():
        lines.append(f"- [{label}] " + (f"`{' '.join(flags)}`" if flags else "none: the paper's setting"))
    return "\n".join(lines)


def render_provenance(groups):
    """Each run directory once: its seeds, and each launch's commit and command."""
    lines = ["## Provenance", "", "Each run directory, and one line per launch of it (a `--resume` adds one):", ""]
    runs = {}
    for group in groups:
        for record in group.seeds:
            runs.setdefault(record.run_dir, []).append(record)
    for run_dir, records in runs.items():
        seeds = ("seed " if len(records) == 1 else "seeds ") + ", ".join(str(record.seed) for record in records)
        lines.append(f"- `{run_dir}` ({seeds}):" if records[0].provenance else
                     f"- `{run_dir}` ({seeds}): no provenance recorded")
        for entry in records[0].provenance:
            state = {True: "dirty", False: "clean", None: "tree state unknown"}[entry.get("dirty")]
            commit = (entry.get("commit") or "no git")[:12]
            xla_flags = f"XLA_FLAGS={shlex.quote(entry['xla_flags'])} " if entry.get("xla_flags") else ""
            lines.append(f"  - {entry.get('time')}, commit {commit} ({state}), {entry.get('device_kind')} × "
                         f"{entry.get('device_count')}: `{xla_flags}{entry.get('command')}`")
    return "\n".join(lines)


def render_page(groups, args):
    """The whole page: the command that writes it, the intro, Table 1 and its notes, the figures, the provenance."""
    labels = setting_labels(groups)
    intro = open(args.intro).read().strip() if args.intro else ""
    notes = (f"R and C: each seed's last evaluation (mean over its eval episodes), then mean ± std over seeds "
             f"(population std). ρ·10⁴: each seed's last training cost rate × 10⁴ (cost per raw env step over the "
             f"whole run); last 20k: the same over its last {RECENT_STEPS:,} raw steps. steps: raw env steps every seed "
             f"reached; the paper's values are at {PAPER_STEPS:,}. steps/s: the median `charts/SPS` of the log rows, "
             f"raw env steps per second per seed while training (evaluation excluded; the seeds of one --num-seeds run "
             f"train at once), on the device the provenance names.")
    figures = [f"![{env_id}]({name})" for env_id, _ in by_task(groups)
               for name in (figure_name(env_id), figure_name(env_id, "cost-lambda"))]
    parts = [f"_Generated by `{command_line(args)}` from the run directories it names; edit the intro file, not "
             f"this page._", intro, "## Table 1", render_table(groups, labels), notes, render_settings(labels),
             "## Learning curves", *figures, render_provenance(groups)]
    return "\n\n".join(part for part in parts if part) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Learning curves


def eval_curves(group):
    """Eval steps shared by all seeds, and the mean and std over seeds of the eval return and cost there."""
    per_seed = [{row["global_step"]: (row["eval/return_mean"], row["eval/cost_mean"]) for row in record.rows
                 if "eval/return_mean" in row} for record in group.seeds]
    steps = sorted(set.intersection(*[set(evals) for evals in per_seed]))
    values = np.array([[evals[step] for step in steps] for evals in per_seed])  # (seeds, steps, return/cost)
    return np.array(steps), values.mean(0), values.std(0)


THOUSANDS = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k")  # step axes: 150k, not 150000


def line_style(i):
    """The i-th group's colour and line: ten colours, solid, then the same ten dash-dotted, then dotted (the paper's
    values are dashed)."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "-.", ":")[i // 10 % 3]}


def plot_task(env_id, groups, labels, out):
    """One figure per task: eval return and eval cost against raw env steps, mean +- std over seeds, the groups
    overlaid, the paper's final value dashed (once per method), into out/<env_id>.png."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    drawn_paper = set()
    for i, group in enumerate(groups):
        style = line_style(i)
        steps, mean, std = eval_curves(group)
        paper = paper_values(group)
        for k, ax in enumerate(axes):
            ax.plot(steps, mean[:, k], **style, marker="o", markersize=3,
                    label=f"{group_label(group, labels)}, {plural(len(group.seeds), 'seed')}")
            ax.fill_between(steps, mean[:, k] - std[:, k], mean[:, k] + std[:, k], color=style["color"], alpha=0.2)
            if paper is not None and group.mode not in drawn_paper:
                ax.axhline(paper[2 * k], color=style["color"], linestyle="--", linewidth=1,
                           label=f"{group.mode}, paper at {PAPER_STEPS / 1e6:g}M steps")
        drawn_paper.add(group.mode)
    for ax, name in zip(axes, ["eval return", "eval cost"]):
        ax.xaxis.set_major_formatter(THOUSANDS)
        ax.set_xlabel("raw env steps")
        ax.set_ylabel(f"{name} per episode")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    legend_rows = -(-len(names) // 3)
    fig.set_figheight(3.6 + 0.3 * legend_rows)  # room under the axes for the legend
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"{env_id}: eval return and cost, mean ± std over seeds")
    fig.tight_layout(rect=(0, 0.3 * legend_rows / fig.get_figheight(), 1, 1))
    fig.savefig(os.path.join(out, figure_name(env_id)), dpi=100)
    plt.close(fig)


def log_curve(group, key):
    """Log steps at which every seed logged `key`, and the mean and std over seeds there."""
    per_seed = [{row["global_step"]: row[key] for row in record.rows if key in row} for record in group.seeds]
    steps = sorted(set.intersection(*[set(values) for values in per_seed]))
    values = np.array([[values[step] for step in steps] for values in per_seed]).reshape(len(per_seed), len(steps))
    return np.array(steps), values.mean(0), values.std(0)


def plot_cost_and_multiplier(env_id, groups, labels, out):
    """One figure per task: the training envs' cost per episode (the episodes that ended between two log rows) and
    the multiplier lambda (log scale; methods whose planner uses costs), against raw env steps, mean over seeds with
    the std shaded, into out/<env_id>-cost-lambda.png."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, group in enumerate(groups):
        label, style = f"{group_label(group, labels)}, {plural(len(group.seeds), 'seed')}", line_style(i)
        for ax, key in zip(axes, ["train/episode_cost", "lagrange/lambda"]):
            if key == "lagrange/lambda" and not uses_cost(group.seeds[0].config):
                continue
            steps, mean, std = log_curve(group, key)
            ax.plot(steps, mean, **style, label=label)
            ax.fill_between(steps, mean - std, mean + std, color=style["color"], alpha=0.2)
    axes[1].set_yscale("log")
    for ax, name in zip(axes, ["training cost per episode", "multiplier λ"]):
        ax.xaxis.set_major_formatter(THOUSANDS)
        ax.set_xlabel("raw env steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    legend_rows = -(-len(names) // 3)
    fig.set_figheight(3.6 + 0.3 * legend_rows)
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"{env_id}: training cost and the multiplier λ, mean ± std over seeds")
    fig.tight_layout(rect=(0, 0.3 * legend_rows / fig.get_figheight(), 1, 1))
    fig.savefig(os.path.join(out, figure_name(env_id, "cost-lambda")), dpi=100)
    plt.close(fig)


def uses_cost(config):
    rule = planner.ELITE_RULES.get(config["planner"])
    return rule is None or rule.uses_cost


def figure_name(env_id, kind=None):
    return f"{env_id}.png" if kind is None else f"{env_id}-{kind}.png"


def plural(count, noun):
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


if __name__ == "__main__":
    main()
