"""How OpenMP's idle threads wait, chosen before torch is imported (OpenMP reads it once, when torch loads).

Between two ops a CPU thread either spins (ACTIVE) or sleeps (PASSIVE). On the project's 2-core machine the
`cpu_cnn` training step ran at 500 img/s spinning against 390 sleeping with the machine to itself, but at 182
against 279 beside one busy process: a spinning thread whose core other work takes stalls every op of the step
(BENCHMARKS.md). So a single training run started on an idle machine spins, and everything else sleeps: other
commands, several runs at once (`--jobs`, `--seeds`), and a run started beside other work (half a core or more
busy at its start).
"""

from __future__ import annotations

import os
import sys
import time

IDLE_CORES = 0.5  # other processes using less than this many cores' worth of CPU: the machine counts as idle

_chosen: tuple[str, str] | None = None  # what `choose` set, and why


def busy_cores(window_s: float = 0.25) -> float | None:
    """How many cores' worth of CPU the machine's other processes use now, over `window_s` seconds (Linux's
    /proc/stat), else the 1-minute load average, else None. Measured now, not averaged over the last minute, so
    that `scripts/train.sh`'s own pip step just before does not count as other work."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks), ticks[3] + ticks[4]

    try:
        (total0, idle0), _, (total1, idle1) = sample(), time.sleep(window_s), sample()
        if total1 > total0:
            return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except OSError:  # neither (Windows)
        return None


def wait_policy(args: list[str], busy: float | None) -> tuple[str, str]:
    """(OMP_WAIT_POLICY, why) for a `fervit` command line `args` while other work uses `busy` cores."""
    if not args or args[0] != "train":
        return "PASSIVE", "not a training run"
    if any(a.split("=")[0] in ("--jobs", "--seeds") for a in args):
        return "PASSIVE", "several runs share the cores"
    if busy is None:
        return "PASSIVE", "the machine's load is unknown"
    if busy >= IDLE_CORES:
        return "PASSIVE", f"{busy:.1f} cores busy at the start: other work is running"
    return "ACTIVE", f"{busy:.1f} cores busy at the start: the machine is idle"


def choose(args: list[str]) -> None:
    """Set OMP_WAIT_POLICY for this process unless the environment sets it or torch is already loaded."""
    global _chosen
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    busy = busy_cores() if args[:1] == ["train"] else None  # only a training run waits the quarter second
    policy, why = wait_policy(args, busy)
    os.environ["OMP_WAIT_POLICY"] = policy
    _chosen = (policy, why)


def set_by_fervit(name: str) -> bool:
    """Whether `choose` set the environment variable `name` (not the user), so a child meant to run as a user's
    own script would run should not inherit it."""
    return name == "OMP_WAIT_POLICY" and _chosen is not None and os.environ.get(name) == _chosen[0]


def describe() -> str:
    """The policy this process runs under, and why, for the run's log and config."""
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    if _chosen is not None and _chosen[0] == policy:
        return f"{policy} ({_chosen[1]})"
    return f"{policy} (set in the environment)" if policy else "OpenMP's default (not set)"
