#!/usr/bin/env python3
"""Markdown rows for RESULTS.md from the summary.json that `experiments/gpu_experiment.py` brings back.

    python experiments/report_runs.py ../shared/gpu-runs/DATE/callN-summary.json [...]

One row per job (recipe, parameters, epochs, PublicTest, PrivateTest, mirror and ten-crop TTA, disgusted recall,
and with `train.log_test` the training time until PrivateTest first reached 73%), one per ensemble, and for jobs
that differ only in `train.seed` their mean and standard deviation. The best job is named by PublicTest
accuracy: that is the only number anything is chosen on.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path


def pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def recipe(job: dict) -> str:
    """`--preset P` plus the job's settings, less train.log_test (it only adds a reported column)."""
    sets = [s for s in job.get("set", []) if not s.startswith("train.log_test")]
    return " ".join([f"`--preset {job['preset']}`"] + [f"`{s}`" for s in sets])


def job_rows(summary: dict) -> list[str]:
    plan_jobs = {j["name"]: j for j in summary["plan"]["jobs"]}
    rows = []
    for name, r in summary["jobs"].items():
        if "val_acc" not in r:
            rows.append(f"| `{name}` | {recipe(plan_jobs[name])} | failed: see its train.log | | | | | | | | |")
            continue
        reached = r.get("time_to_0.73")
        to73 = (f"{reached['seconds']:.0f} s (epoch {reached['epoch']})" if reached else
                f"not reached (best {pct(r['best_logged_test_acc'])})" if "best_logged_test_acc" in r else "-")
        rows.append(f"| `{name}` | {recipe(plan_jobs[name])} | {r['params']:,} | {r['epochs']} ({r['best_epoch']}) | "
                    f"{pct(r.get('final_train_acc'))} | {pct(r['val_acc'])} | **{pct(r['test_acc'])}** | "
                    f"{pct(r.get('test_acc_tta'))} | {pct(r.get('test_acc_tta10'))} | {pct(r['disgusted_recall'])} | "
                    f"{to73} |")
    return rows


def seed_groups(summary: dict) -> dict[str, list[str]]:
    """Jobs whose settings are equal but for train.seed, keyed by their shared recipe."""
    groups: dict[str, list[str]] = {}
    for job in summary["plan"]["jobs"]:
        if "val_acc" not in summary["jobs"].get(job["name"], {}):
            continue
        key = recipe({**job, "set": [s for s in job.get("set", []) if not s.startswith("train.seed=")]})
        groups.setdefault(key, []).append(job["name"])
    return {k: v for k, v in groups.items() if len(v) >= 2}


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}%"


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fraction(x) -> bool:
    return _is_number(x) and 0 <= x <= 1


# a finished job's fields: key -> (check, what it must be, required)
JOB_FIELDS = {"val_acc": (_fraction, "an accuracy in [0, 1]", True),
              "test_acc": (_fraction, "an accuracy in [0, 1]", True),
              "params": (lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer", True),
              "epochs": (lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer", True),
              "best_epoch": (lambda x: isinstance(x, int) and not isinstance(x, bool), "an integer", True),
              "disgusted_recall": (_fraction, "a recall in [0, 1]", True),
              "final_train_acc": (_fraction, "an accuracy in [0, 1]", False),
              "test_acc_tta": (_fraction, "an accuracy in [0, 1]", False),
              "test_acc_tta10": (_fraction, "an accuracy in [0, 1]", False),
              "best_logged_test_acc": (_fraction, "an accuracy in [0, 1]", False)}


def check_summary(summary) -> None:
    """ValueError naming the first field that is not what experiments/gpu_experiment.py writes: a damaged summary
    must not pick its best job from strings, nor group different recipes as seeds."""
    if not isinstance(summary, dict):
        raise ValueError("it is not a JSON object")
    plan, jobs = summary.get("plan"), summary.get("jobs")
    if not isinstance(plan, dict) or not isinstance(plan.get("jobs"), list):
        raise ValueError("'plan' must be an object with a 'jobs' list")
    if not isinstance(jobs, dict):
        raise ValueError("'jobs' must be an object of job name -> results")
    names = []
    for i, job in enumerate(plan["jobs"]):
        if not isinstance(job, dict) or not isinstance(job.get("name"), str) or not isinstance(job.get("preset"), str):
            raise ValueError(f"plan job {i + 1} needs a \"name\" and a \"preset\" (strings)")
        sets = job.get("set", [])
        if not isinstance(sets, list) or not all(isinstance(x, str) for x in sets):
            raise ValueError(f"plan job '{job['name']}': \"set\" must be a list of KEY=VALUE strings")
        names.append(job["name"])
    if len(set(names)) != len(names):
        raise ValueError("plan job names must be unique")
    for name, r in jobs.items():
        if name not in names:
            raise ValueError(f"job '{name}' is not in the plan")
        if not isinstance(r, dict):
            raise ValueError(f"job '{name}' must be an object")
        if "val_acc" not in r:
            continue  # a failed job: one row that says so
        for key, (ok, what, required) in JOB_FIELDS.items():
            if (required or key in r) and not ok(r.get(key)):
                raise ValueError(f"job '{name}': {key!r} must be {what}, got {json.dumps(r.get(key))}")
        reached = r.get("time_to_0.73")
        if reached is not None and not (isinstance(reached, dict) and _is_number(reached.get("seconds"))
                                        and isinstance(reached.get("epoch"), int)):
            raise ValueError(f"job '{name}': 'time_to_0.73' must be {{\"seconds\": ..., \"epoch\": ...}}")
    ensembles = summary.get("ensembles") or {}
    if not isinstance(ensembles, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("members"), list) and all(isinstance(m, str) for m in e["members"])
            and all(_fraction(e[k]) for k in ("val_acc", "test_acc", "test_acc_tta", "test_acc_tta10") if k in e)
            for e in ensembles.values()):
        raise ValueError("'ensembles' must map each name to its members and accuracies in [0, 1]")
    if not isinstance(summary.get("checkpoints") or {}, dict):
        raise ValueError("'checkpoints' must be an object")
    for key in ("wall_s", "budget_s"):
        if summary.get(key) is not None and not _is_number(summary[key]):
            raise ValueError(f"{key!r} must be a number of seconds, got {json.dumps(summary[key])}")


def report(path: Path) -> str:
    summary = json.loads(path.read_text())
    check_summary(summary)
    budget = summary.get("budget_s", summary["plan"].get("budget"))  # what the command ran with
    lines = [f"From `{path}` ({summary.get('wall_s', 0):.0f} s for the whole command). Every job: `fervit train "
             f"--protocol fer2013{f' --set train.time_budget_s={budget}' if budget else ''}` plus its recipe below.", "",
             "| job | recipe | params | epochs (best) | final train acc | PublicTest | PrivateTest | + mirror TTA | "
             "+ ten-crop TTA | disgusted recall | training time to 73% PrivateTest |",
             "|---|---|---|---|---|---|---|---|---|---|---|", *job_rows(summary)]
    done = {n: r for n, r in summary["jobs"].items() if "val_acc" in r}
    if done:
        best = max(done, key=lambda n: done[n]["val_acc"])
        lines += ["", f"Best on PublicTest: `{best}` ({pct(done[best]['val_acc'])}); its PrivateTest: "
                      f"{pct(done[best]['test_acc'])}."]
    for key, names in seed_groups(summary).items():
        lines += ["", f"{len(names)} seeds of {key} ({', '.join(names)}): PublicTest "
                      f"{mean_std([done[n]['val_acc'] for n in names])}, PrivateTest "
                      f"{mean_std([done[n]['test_acc'] for n in names])}"
                  + (f", with ten-crop {mean_std([done[n]['test_acc_tta10'] for n in names])}"
                     if all("test_acc_tta10" in done[n] for n in names) else "") + "."]
    if summary.get("ensembles"):
        lines += ["", "| ensemble | members | PublicTest | PrivateTest | + mirror TTA | + ten-crop TTA |",
                  "|---|---|---|---|---|---|"]
        for name, e in summary["ensembles"].items():
            lines.append(f"| `{name}` | {', '.join(e['members'])} | {pct(e.get('val_acc'))} | "
                         f"**{pct(e.get('test_acc'))}** | {pct(e.get('test_acc_tta'))} | {pct(e.get('test_acc_tta10'))} |")
    packed = summary.get("checkpoints", {})
    if packed:
        lines += ["", "Checkpoints brought back: " + ", ".join(
            f"`{n}` ({re.sub(r'^not packed: ', 'not packed, ', v)})" for n, v in packed.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("summary", nargs="+", type=Path)
    args = ap.parse_args(argv)
    reports = []
    for path in args.summary:
        try:
            reports.append(report(path))
        except RecursionError:  # json gives up on deeply nested input this way
            print(f"report_runs: error: '{path}' is not a readable summary written by experiments/gpu_experiment.py "
                  "(it is nested too deeply)", file=sys.stderr)
            return 2
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:  # ValueError: damaged JSON
            print(f"report_runs: error: '{path}' is not a readable summary written by experiments/gpu_experiment.py "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            return 2
    print("\n\n".join(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
