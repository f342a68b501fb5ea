"""How OpenMP's idle threads wait, chosen before torch is imported (OpenMP reads it once, when torch loads).

Between two ops a CPU thread either spins (ACTIVE) or sleeps (PASSIVE). On the project's 2-core machine the
`cpu_cnn` training step ran at 500 img/s spinning against 390 sleeping with the machine to itself, but at 182
against 279 beside one busy process: a spinning thread whose core other work takes stalls every op of the step
(BENCHMARKS.md). So a single training run started on an idle machine spins, and everything else sleeps: other
commands, several runs at once (`--jobs`, `--seeds`), and a run started beside other work.
"""

from __future__ import annotations

import os
import sys

IDLE_LOAD = 0.5  # the 1-minute load average below which the machine counts as idle

_chosen: tuple[str, str] | None = None  # what `choose` set, and why


def wait_policy(args: list[str], load: float) -> tuple[str, str]:
    """(OMP_WAIT_POLICY, why) for a `fervit` command line `args` on a machine with this 1-minute load average."""
    if not args or args[0] != "train":
        return "PASSIVE", "not a training run"
    if any(a.split("=")[0] in ("--jobs", "--seeds") for a in args):
        return "PASSIVE", "several runs share the cores"
    if load >= IDLE_LOAD:
        return "PASSIVE", f"load average {load:.1f} at the start: other work is running"
    return "ACTIVE", f"load average {load:.1f} at the start: the machine is idle"


def choose(args: list[str]) -> None:
    """Set OMP_WAIT_POLICY for this process unless the environment sets it or torch is already loaded."""
    global _chosen
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average (Windows): sleep, the safe choice
        load = float("inf")
    policy, why = wait_policy(args, load)
    os.environ["OMP_WAIT_POLICY"] = policy
    _chosen = (policy, why)


def describe() -> str:
    """The policy this process runs under, and why, for the run's log and config."""
    policy = os.environ.get("OMP_WAIT_POLICY", "")
    if _chosen is not None and _chosen[0] == policy:
        return f"{policy} ({_chosen[1]})"
    return f"{policy} (set in the environment)" if policy else "OpenMP's default (not set)"
