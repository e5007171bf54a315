"""CPU time, resident memory and disk use of processes and directories, read from /proc.

Read straight from /proc (Linux) rather than through psutil, so the benchmark runs in the
project's own ``.venv`` and the smoke test needs nothing extra.

CPU of a process *tree* is the process's own time plus ``cutime``/``cstime``: the time of every
descendant it has already waited for (each of which includes the ones *it* waited for). The
service, bash and git all reap their children, so once a job has finished its git and ssh
processes are counted in the service's numbers.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cpu:
    """Seconds of CPU: the process itself, and its reaped descendants."""

    own: float
    children: float

    @property
    def total(self) -> float:
        return self.own + self.children

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.own - other.own, self.children - other.children)


def cpu(pid: int) -> Cpu:
    """CPU of ``pid`` and its reaped descendants; raises OSError if it is gone."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # After "pid (comm) ": state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return Cpu((utime + stime) / _TICK, (cutime + cstime) / _TICK)


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        return _status_kib(pid, "VmRSS") * 1024
    except OSError:
        return 0


def rss_high_water(pid: int) -> int:
    """The kernel's own peak resident set size of ``pid`` (VmHWM) in bytes."""
    try:
        return _status_kib(pid, "VmHWM") * 1024
    except OSError:
        return 0


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid``."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def live_cpu(pid: int) -> float:
    """CPU seconds of ``pid``'s live descendants (not yet in its cutime)."""
    total = 0.0
    for child in descendants(pid):
        try:
            total += cpu(child).own
        except OSError:
            pass
    return total


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (like ``du``); files may vanish while we walk."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                pass
    return total


@dataclass
class Peaks:
    rss: int = 0  # the watched process alone
    tree_rss: int = 0  # it and its live descendants
    disk: dict[str, int] = field(default_factory=dict)
    samples: int = 0


class Sampler:
    """Samples RSS every ``interval`` s and disk every ``disk_interval`` s in a thread."""

    def __init__(
        self,
        pid: int | None,
        dirs: dict[str, Path],
        *,
        interval: float = 0.05,
        disk_interval: float = 0.25,
    ) -> None:
        self.pid = pid
        self.dirs = dirs
        self.interval = interval
        self.disk_interval = disk_interval
        self.peaks = Peaks(disk={name: 0 for name in dirs})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._sample(time.monotonic(), disk=True, tree=True)

    def _sample(self, now: float, *, disk: bool, tree: bool = False) -> None:
        p = self.peaks
        if self.pid is not None:
            own = rss(self.pid)
            p.rss = max(p.rss, own)
            # The tree includes the process: never below its own peak, even between the
            # (less frequent) samples of the whole tree.
            children = sum(rss(c) for c in descendants(self.pid)) if tree else 0
            p.tree_rss = max(p.tree_rss, own + children)
        if disk:
            for name, path in self.dirs.items():
                p.disk[name] = max(p.disk[name], disk_usage(path))
        p.samples += 1

    def _run(self) -> None:
        next_disk = 0.0
        next_tree = 0.0
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            self._sample(now, disk=now >= next_disk, tree=now >= next_tree)
            if now >= next_disk:
                next_disk = now + self.disk_interval
            if now >= next_tree:
                next_tree = now + self.disk_interval
