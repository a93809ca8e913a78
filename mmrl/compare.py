"""``mmrl compare``: train one config under several presets and seeds, then tabulate and plot the runs.

    mmrl compare CONFIG [key=value ...] --presets grpo,dapo --seeds 0,1,2 --output-dir runs/cmp [--max-steps N]

Each (preset, seed) is one ``mmrl train`` *subprocess* into ``DIR/PRESET/seed_S`` (output teed to
``train.log`` there), one at a time: each run's memory is returned to the system, and a crash is recorded
as a failed run with its exit code instead of ending the sweep. A run whose ``summary.json`` exists is
reused (``--force`` trains it again); a run stopped before it finished continues from its newest
checkpoint (``--resume latest``), so a killed sweep is restarted with the same command.

Writes ``DIR/compare.md`` (the table, with the command at the top; also printed), ``DIR/compare.json``
(every run's numbers and reward curve) and ``DIR/reward_curves.png`` (mean over seeds, min–max band).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mmrl.config import PRESETS, ConfigError, to_dict

RUN_LOG = "train.log"
FINAL_FRACTION = 0.1  # final reward / length: mean over the last 10% of rollout steps (at least one)
BASELINE = "grpo"
# keys the sweep sets for every run itself; a user override of them would make the runs collide
OWNED_KEYS = ("preset", "seed", "output_dir", "resume_from")
# config keys that may differ between a stored run and this sweep without changing what it measured
IGNORED_KEYS = ("output_dir", "resume_from", "logging")


# ---------------------------------------------------------------------------------------------- planning


def parse_presets(text: str) -> list[str]:
    """Comma-separated preset names, each in :data:`mmrl.config.PRESETS` (checked before anything runs)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ConfigError("--presets is empty; give e.g. --presets grpo,dapo")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        hints = [f"{n!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(n, PRESETS, n=1))
                 else repr(n) for n in unknown]
        raise ConfigError(f"unknown preset {', '.join(hints)}. Valid presets: {sorted(PRESETS)}")
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = list(dict.fromkeys(int(s) for s in text.split(",") if s.strip()))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise ConfigError("--seeds is empty; give e.g. --seeds 0,1,2")
    return seeds


def run_dir(output_dir: Path, preset: str, seed: int) -> Path:
    return output_dir / preset / f"seed_{seed}"


def run_overrides(overrides: list[str], preset: str, seed: int, directory: Path) -> list[str]:
    """The ``mmrl train`` overrides of one run. The progress bar is off by default because its carriage
    returns make ``train.log`` unreadable; a user override after it still wins."""
    owned = [o for o in overrides if o.partition("=")[0].strip() in OWNED_KEYS]
    if owned:
        raise ConfigError(f"mmrl compare sets {', '.join(OWNED_KEYS)} for each run itself; remove {owned} "
                          "(use --presets, --seeds and --output-dir)")
    return ["logging.progress_bar=false", *overrides, f"preset={preset}", f"seed={seed}", f"output_dir={directory}"]


def validate(config: str, overrides: list[str], presets: list[str], output_dir: Path) -> dict[str, dict]:
    """Load and check the config under every preset before the first run starts (a bad config or override
    fails now, not hours into the sweep). Returns each preset's config as ``config.json`` would hold it."""
    from mmrl.cli import _load  # the CLI is the one place that knows the tasks

    expected = {}
    for preset in presets:
        cfg, _ = _load(config, run_overrides(overrides, preset, 0, run_dir(output_dir, preset, 0)))
        expected[preset] = json.loads(json.dumps(to_dict(cfg)))
    return expected


def config_differences(stored: dict, expected: dict, prefix: str = "") -> list[str]:
    """Dotted keys where a stored run's ``config.json`` differs from this sweep's config."""
    out = []
    for key in sorted(set(stored) | set(expected)):
        if not prefix and key in IGNORED_KEYS:
            continue
        a, b = stored.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} in the run, {b!r} now")
    return out


def finished(directory: Path) -> bool:
    """A run is finished when its summary exists and says it was not stopped early (preempted)."""
    path = directory / "summary.json"
    if not path.is_file():
        return False
    try:
        return "preempted_at_step" not in json.loads(path.read_text())
    except ValueError:  # a summary torn by a kill: train again
        return False


def stored_differences(directory: Path, expected: dict, seed: int) -> list[str]:
    path = directory / "config.json"
    if not path.is_file():
        return []
    try:
        return config_differences(json.loads(path.read_text()), {**expected, "seed": seed})
    except ValueError:  # torn by a kill before the run started: nothing of it is worth keeping
        return ["config.json: unreadable"]


def check_reusable(directory: Path, expected: dict, seed: int) -> None:
    """A stored run trained with another config would silently mix two experiments into one row."""
    differences = stored_differences(directory, expected, seed)
    if differences:
        raise ConfigError(f"{directory} was trained with another config ({'; '.join(differences[:5])}); "
                          "use --force to train it again or another --output-dir")


# ---------------------------------------------------------------------------------------------- running


class SweepStopped(Exception):
    """The sweep got SIGINT or SIGTERM; the run in progress was passed the signal and has stopped."""


def execute(command: list[str], log_path: Path, echo: bool) -> int:
    """Run ``command``, appending its stdout and stderr to ``log_path`` (and to our stdout when ``echo``).
    Appending keeps the output of an earlier, killed attempt of the same run.

    The run gets a session of its own and each SIGINT / SIGTERM the sweep receives is passed on to it once:
    ``mmrl train`` saves a checkpoint on the first and exits at once on the second, and a Ctrl-C in a
    terminal must count once, not twice (it would reach both processes). Then :class:`SweepStopped`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log fills as the run goes, not at exit
    received: list[int] = []
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)

        def forward(signum: int, frame: object) -> None:
            received.append(signum)
            if proc.poll() is None:
                proc.send_signal(signum)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()  # `tail -f train.log` follows the run
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            code = proc.wait()
        finally:
            if proc.poll() is None:  # an error here, not a signal: the run must not outlive the sweep
                proc.kill()
                proc.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if received:
        raise SweepStopped(f"stopped by {signal.Signals(received[0]).name}; the run in progress exited with "
                           f"code {code} (after saving a checkpoint unless signalled twice)")
    return code


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- numbers


def reward_curve(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """One row per rollout step: the last optimizer update's row (several updates per rollout log the same
    rollout metrics, and ``step_time`` is cumulative within the rollout step). Evaluation rows, which carry
    no ``reward``, are left out."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        if row.get("reward") is None:
            continue
        by_step[int(row.get("rollout_step", row.get("step", len(by_step) + 1)))] = row
    return sorted(by_step.items())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_numbers(directory: Path) -> dict[str, Any]:
    """One run's numbers: held-out accuracy from ``summary.json``; final reward and mean completion length
    over the last :data:`FINAL_FRACTION` of rollout steps and median step time from ``metrics.jsonl``."""
    summary = json.loads((directory / "summary.json").read_text())
    rows = []
    metrics = directory / "metrics.jsonl"
    if metrics.is_file():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    curve = reward_curve(rows)
    last = curve[-max(1, int(len(curve) * FINAL_FRACTION)):] if curve else []
    times = [r["step_time"] for _, r in curve if r.get("step_time") is not None]
    return {
        "accuracy_before": summary.get("accuracy_before"),
        "accuracy_after": summary.get("accuracy_after"),
        "final_reward": _mean([r["reward"] for _, r in last]),
        "mean_length": _mean([r["completions/mean_length"] for _, r in last
                              if r.get("completions/mean_length") is not None]),
        "step_time": statistics.median(times) if times else None,
        "steps": len(curve),
        "wall_time_s": summary.get("wall_time_s"),
        "curve": [[step, r["reward"]] for step, r in curve],
    }


NUMBERS = ("accuracy_before", "accuracy_after", "final_reward", "mean_length", "step_time")


def aggregate(runs: list[dict[str, Any]], presets: list[str]) -> dict[str, dict[str, Any]]:
    """Per preset over its finished runs: mean and sample standard deviation (``None`` with one seed) of
    every number, and the difference of mean accuracy after RL to GRPO's when GRPO is in the sweep."""
    out: dict[str, dict[str, Any]] = {}
    for preset in presets:
        mine = [r for r in runs if r["preset"] == preset]
        done = [r for r in mine if r["status"] in ("finished", "reused")]
        row: dict[str, Any] = {"seeds_finished": len(done), "seeds": len(mine),
                               "failed": [r["seed"] for r in mine if r["status"] == "failed"]}
        for key in NUMBERS:
            values = [r[key] for r in done if r.get(key) is not None]
            row[key] = {"mean": _mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                        "n": len(values)}
        out[preset] = row
    base = out.get(BASELINE, {}).get("accuracy_after", {}).get("mean")
    for preset, row in out.items():
        mean = row["accuracy_after"]["mean"]
        row["vs_grpo"] = None if preset == BASELINE or base is None or mean is None else mean - base
    return out


def _cell(stat: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "—"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text if stat["std"] is None else f"{text} ± {scale * stat['std']:.{digits}f}"


def markdown(command: str, table: dict[str, dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    """The comparison as markdown: the command, one row per preset, how each number was measured, and every
    failed run with its exit code and log."""
    with_base = BASELINE in table
    head = ["preset", "seeds", "held-out acc. before (%)", "held-out acc. after (%)"]
    head += ["vs grpo (points)"] if with_base else []
    head += ["final reward", "mean length (tokens)", "step time (s)"]
    lines = ["# mmrl compare", "", "```", command, "```", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, row in table.items():
        cells = [preset, f"{row['seeds_finished']}/{row['seeds']}",
                 _cell(row["accuracy_before"], 100), _cell(row["accuracy_after"], 100)]
        if with_base:
            diff = row["vs_grpo"]
            cells.append("—" if diff is None else f"{100 * diff:+.1f}" + (" (not better)" if diff <= 0 else ""))
        cells += [_cell(row["final_reward"], digits=3), _cell(row["mean_length"]), _cell(row["step_time"], digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Mean ± sample standard deviation over the finished seeds. Accuracy: `eval.reward` on the "
              f"held-out set before and after RL. Final reward and mean length: mean over the last "
              f"{FINAL_FRACTION:.0%} of each run's rollout steps (at least one). Step time: median over each "
              f"run's rollout steps."]
    if with_base:
        lines.append("vs grpo: mean accuracy after RL minus GRPO's, in points; \"not better\" marks a preset "
                     "that does not beat GRPO here.")
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r['preset']} seed {r['seed']}: exit code {r['returncode']}, log `{r['log']}`" for r in failed]
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def plot_curves(runs: list[dict[str, Any]], presets: list[str], path: Path, window: int = 10) -> Path | None:
    """Per preset the mean training-reward curve over its seeds (each run smoothed by a moving mean) with
    a min–max band, x = rollout step. A step is drawn where every finished seed logged it."""
    try:
        import matplotlib
    except ImportError:
        print("mmrl compare: matplotlib is not installed; no reward_curves.png", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for preset in presets:
        curves = [dict(zip([s for s, _ in r["curve"]], _smooth([v for _, v in r["curve"]], window)))
                  for r in runs if r["preset"] == preset and r["status"] != "failed" and r.get("curve")]
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[c[s] for c in curves] for s in steps]
        line, = ax.plot(steps, [sum(v) / len(v) for v in values], linewidth=2, label=f"{preset} ({len(curves)})")
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.2, linewidth=0)
    ax.set_xlabel("rollout step")
    ax.set_ylabel(f"training reward (moving mean, {window} steps)")
    ax.set_title("reward: mean over seeds (number in the legend), min–max band")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- the sweep


def _fmt_pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def sweep(config: str, overrides: list[str], presets: list[str], seeds: list[int], output_dir: Path,
          command: str, force: bool = False, echo: bool = False) -> int:
    """Run (or reuse) every (preset, seed), then write the table, the raw numbers and the plot.
    Returns 0 when every run finished, 1 when some failed (the table is written either way)."""
    expected = validate(config, overrides, presets, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plan = [(p, s) for p in presets for s in seeds]
    for preset, seed in plan:  # every stored run is checked before the first new one trains
        directory = run_dir(output_dir, preset, seed)
        if not force and finished(directory):
            check_reusable(directory, expected[preset], seed)
    runs = []
    for i, (preset, seed) in enumerate(plan, 1):
        directory = run_dir(output_dir, preset, seed)
        log = directory / RUN_LOG
        record: dict[str, Any] = {"preset": preset, "seed": seed, "dir": str(directory), "log": str(log),
                                  "returncode": None}
        prefix = f"[{i}/{len(plan)}] {preset} seed {seed}:"
        if not force and finished(directory):
            record["status"] = "reused"
            record.update(run_numbers(directory))
            print(f"{prefix} reused (summary.json exists; --force trains it again)", flush=True)
        else:
            # An unfinished run of another config (say, a crash fixed by a new override) starts again
            # rather than resuming its checkpoint under the new settings.
            changed = not force and stored_differences(directory, expected[preset], seed)
            if changed:
                print(f"{prefix} the stopped attempt had another config ({changed[0]}); starting again", flush=True)
            if (force or changed) and directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "mmrl.cli", "train", config,
                   *run_overrides(overrides, preset, seed, directory)]
            cmd += [] if force else ["--resume", "latest"]  # continues a run the killed sweep left behind
            print(f"{prefix} training (log: {log})", flush=True)
            start = time.perf_counter()
            record["returncode"] = code = execute(cmd, log, echo)
            record["status"] = "finished" if code == 0 and finished(directory) else "failed"
            if record["status"] == "failed":
                why = f"exit code {code}" if code else "stopped before its last step"
                print(f"{prefix} FAILED ({why}); log: {log}\n{_tail(log)}", flush=True)
                runs.append(record)
                continue
            record.update(run_numbers(directory))
            print(f"{prefix} done in {time.perf_counter() - start:.0f}s: held-out accuracy "
                  f"{_fmt_pct(record['accuracy_before'])} → {_fmt_pct(record['accuracy_after'])}", flush=True)
        runs.append(record)
    table = aggregate(runs, presets)
    text = markdown(command, table, runs)
    (output_dir / "compare.md").write_text(text)
    (output_dir / "compare.json").write_text(json.dumps({"command": command, "presets": table, "runs": runs},
                                                        indent=1))
    plot = plot_curves(runs, presets, output_dir / "reward_curves.png")
    print("\n" + text)
    print(f"table: {output_dir / 'compare.md'}   numbers: {output_dir / 'compare.json'}"
          + (f"   plot: {plot}" if plot else ""))
    return 1 if any(r["status"] == "failed" for r in runs) else 0


def command_line(args: argparse.Namespace) -> str:
    """The sweep as one ``mmrl compare`` command (for the top of the table): the parsed arguments, so it is
    the same whether the sweep was started from a shell or from Python."""
    parts = ["mmrl", "compare", args.config, *args.overrides, "--presets", ",".join(args.presets),
             "--seeds", ",".join(map(str, args.seeds)), "--output-dir", str(args.output_dir)]
    parts += ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    return shlex.join(parts)


def cmd_compare(args: argparse.Namespace) -> int:
    args.presets = parse_presets(args.presets)
    args.seeds = parse_seeds(args.seeds)
    if args.max_steps is not None and args.max_steps <= 0:
        raise ConfigError(f"--max-steps must be positive, got {args.max_steps}")
    overrides = list(args.overrides) + ([f"max_steps={args.max_steps}"] if args.max_steps is not None else [])
    try:
        return sweep(args.config, overrides, args.presets, args.seeds, Path(args.output_dir), command_line(args),
                     force=args.force, echo=args.show_output)
    except SweepStopped as exc:
        print(f"mmrl compare: {exc}. Run the same command again to continue the sweep.", file=sys.stderr)
        return 130


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Registers ``mmrl compare`` on the CLI's subparsers."""
    p = sub.add_parser("compare", help="train one config under several presets and seeds; table + reward plot")
    p.add_argument("config", help="YAML config file, e.g. configs/vision/demo.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run (before the --options)")
    p.add_argument("--presets", required=True, help=f"comma-separated, from: {', '.join(sorted(PRESETS))}")
    p.add_argument("--seeds", default="0", help="comma-separated integers (default: 0)")
    p.add_argument("--output-dir", default="runs/compare", help="runs go to DIR/PRESET/seed_S (default: runs/compare)")
    p.add_argument("--max-steps", type=int, default=None, help="rollout steps of every run (overrides max_steps)")
    p.add_argument("--force", action="store_true", help="train every run again, even those with a summary.json")
    p.add_argument("--show-output", action="store_true", help="print each run's output too (always in train.log)")
    p.set_defaults(fn=cmd_compare)
    return p
