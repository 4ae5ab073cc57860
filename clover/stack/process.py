"""Start and stop one server process by PID, never by name.

A PID file records the PID and the process's start time, so a PID the kernel has since given to
another program is recognised as not ours and left alone. The start time compared is the one
the kernel keeps in clock ticks after boot (/proc/PID/stat), not a wall-clock time: when the
machine's clock is stepped (time sync after boot), a wall-clock start time computed now
differs from the one recorded, and the stack's own servers looked like strangers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


class StackError(RuntimeError):
    """A server of the local stack cannot be installed, started or checked."""


@dataclass(frozen=True)
class PidRecord:
    pid: int
    create_time: float
    start_ticks: int | None = None


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks after boot (field 22 of /proc/PID/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def read_pid(pid_file: Path) -> PidRecord | None:
    """The PID of a process this stack started and that is still running, else None."""
    try:
        data = json.loads(pid_file.read_text())
        record = PidRecord(int(data["pid"]), float(data["create_time"]),
                           data.get("start_ticks"))
        proc = psutil.Process(record.pid)
        # A recycled PID belongs to a process started later than ours.
        if record.start_ticks is not None:
            ours = start_ticks(record.pid) == record.start_ticks
        else:  # a PID file written before start_ticks was recorded
            ours = abs(proc.create_time() - record.create_time) <= 1.0
        if not ours or proc.status() == "zombie":
            return None
        return record
    except (FileNotFoundError, ValueError, KeyError, psutil.Error):
        return None


def start(
    argv: Sequence[str],
    *,
    pid_file: Path,
    log_file: Path,
    cwd: Path,
    env: Mapping[str, str] | None = None,
) -> PidRecord:
    """Start argv in its own session, output appended to log_file, and record its PID."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"\n=== {started} starting: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the CLI; a terminal's Ctrl-C does not reach it
        )
    record = PidRecord(proc.pid, psutil.Process(proc.pid).create_time(), start_ticks(proc.pid))
    pid_file.write_text(json.dumps({"pid": record.pid, "create_time": record.create_time,
                                    "start_ticks": record.start_ticks, "argv": list(argv)}))
    return record


def stop(pid_file: Path, timeout: float = 30.0) -> bool:
    """Stop the process recorded in pid_file: SIGTERM, then SIGKILL after timeout.

    Returns True when a running process was stopped.
    """
    record = read_pid(pid_file)
    pid_file.unlink(missing_ok=True)
    if record is None:
        return False
    try:
        proc = psutil.Process(record.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    except psutil.NoSuchProcess:
        pass
    return True


def port_owner(port: int) -> str | None:
    """Describe the process listening on a TCP port, or None when the port is free."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            if conn.pid is None:
                return "a process this user cannot see"
            try:
                proc = psutil.Process(conn.pid)
                cmd = " ".join(proc.cmdline())[:160] or proc.name()
                return f"PID {conn.pid} ({cmd})"
            except psutil.Error:
                return f"PID {conn.pid}"
    return None


def is_alive(record: PidRecord) -> bool:
    try:
        proc = psutil.Process(record.pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def rss_mb(record: PidRecord) -> float | None:
    try:
        return psutil.Process(record.pid).memory_info().rss / 2**20
    except psutil.Error:
        return None


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            return "\n".join(f.read().decode(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log yet)"
