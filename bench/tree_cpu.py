"""Wall time and CPU time of a command and every process it starts (Ray's daemons and workers too).

    python bench/tree_cpu.py -- COMMAND [ARGS ...]

CPU time is user + system seconds summed over the command's process tree, read
from /proc every half second (a process's last half second can be missed). On a
shared machine the wall time depends on the load; the CPU time hardly does, so it
is the figure to compare runs by. Prints one line on stderr; the exit code is the command's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def tree_cpu(root: int, seen: dict[int, float]) -> None:
    """Update ``seen`` (pid -> user + system CPU seconds) with every live descendant of ``root``."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: ppid
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in cpu:
            seen[pid] = max(seen.get(pid, 0.0), cpu[pid])
        stack.extend(children.get(pid, []))


def run(cmd: list[str], **popen: object) -> tuple[subprocess.Popen[str], float, dict[int, float]]:
    """Run ``cmd`` to its end: (the finished process, wall seconds, pid -> CPU seconds)."""
    t0 = time.monotonic()
    seen: dict[int, float] = {}
    proc = subprocess.Popen(cmd, text=True, **popen)  # type: ignore[call-overload]
    while proc.poll() is None:
        tree_cpu(proc.pid, seen)
        time.sleep(0.5)
    return proc, time.monotonic() - t0, seen


def main() -> None:
    cmd = sys.argv[1:]
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        raise SystemExit("usage: python bench/tree_cpu.py -- COMMAND [ARGS ...]")
    load = os.getloadavg()[0]
    proc, seconds, seen = run(cmd)
    print(
        f"tree_cpu: {seconds:.0f}s wall, {sum(seen.values()):.0f} CPU-s in {len(seen)} processes "
        f"(load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end): {' '.join(cmd)}",
        file=sys.stderr,
    )
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
