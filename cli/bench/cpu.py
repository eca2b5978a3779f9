"""CPU time of process trees from ``/proc`` (Linux): what each part of the stack spends per job.

A snapshot maps every live process to its cumulative user + system CPU seconds and its parent; the CPU a
group spent between two snapshots is the difference, summed over the group's processes (a process that
appeared in between counts in full; one that exited in between is lost, so groups should be long-lived pools).
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    pid: int
    parent: int
    name: str
    cpu_s: float


def available() -> bool:
    return (PROC / "self" / "stat").is_file()


def snapshot() -> dict[int, Process]:
    """Every readable process's parent, command name and CPU seconds so far."""
    tick = os.sysconf("SC_CLK_TCK")
    processes = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[0] is field 3 of proc(5): state; parent is field 4, utime 14, stime 15.
        processes[int(entry.name)] = Process(
            int(entry.name), int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick
        )
    return processes


def tree(processes: dict[int, Process], root: int) -> set[int]:
    """``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for process in processes.values():
        children.setdefault(process.parent, []).append(process.pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in processes and pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, []))
    return found


def spent(before: dict[int, Process], after: dict[int, Process], pids: Iterable[int]) -> float:
    """CPU seconds the processes ``pids`` (as found in ``after``) spent since ``before``."""
    total = 0.0
    for pid in pids:
        if pid in after:
            earlier = before.get(pid)
            total += after[pid].cpu_s - (earlier.cpu_s if earlier is not None else 0.0)
    return total


def named(processes: dict[int, Process], match: Callable[[str], bool]) -> set[int]:
    return {p.pid for p in processes.values() if match(p.name)}


def own_cpu_s() -> float:
    """This process's CPU seconds, all threads (the load generator)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
