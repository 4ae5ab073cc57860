"""Progress for long steps: what is happening, and how long each step took."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from clover.stack.process import StackError, tail

# A long step with nothing to show says it is still running this often (seconds).
HEARTBEAT_S = 30


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def step(title: str) -> Iterator[None]:
    """Print the step, then its duration (or that it failed after how long)."""
    say(f"==> {title}")
    started = time.monotonic()
    try:
        yield
    except BaseException:
        say(f"    failed after {time.monotonic() - started:.1f}s: {title}")
        raise
    say(f"    done in {time.monotonic() - started:.1f}s: {title}")


def run(
    argv: Sequence[str],
    *,
    log_file: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    show: str | None = None,
) -> None:
    """Run a command to completion, its output in log_file.

    Lines matching the regular expression ``show`` are echoed with the elapsed time, and a
    heartbeat line appears after every ``HEARTBEAT_S`` of silence, so a long build shows that
    it moves. A failure raises StackError with the log's tail.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    pattern = re.compile(show) if show else None
    last_said = [started]
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(5):
            if time.monotonic() - last_said[0] >= HEARTBEAT_S:
                say(f"    [{time.monotonic() - started:6.0f}s] still running: {argv[0]} ...")
                last_said[0] = time.monotonic()

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        _stream(argv, log_file, cwd, env, pattern, started, last_said)
    finally:
        done.set()


def _stream(argv: Sequence[str], log_file: Path, cwd: Path | None,
            env: Mapping[str, str] | None, pattern: re.Pattern[str] | None, started: float,
            last_said: list[float]) -> None:
    with open(log_file, "ab") as log:
        log.write(f"\n=== {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv), cwd=cwd, env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert proc.stdout is not None
        for raw in proc.stdout:
            log.write(raw)
            if pattern is not None:
                line = raw.decode(errors="replace").rstrip()
                if pattern.search(line):
                    say(f"    [{time.monotonic() - started:6.0f}s] {line.strip()}")
                    last_said[0] = time.monotonic()
        code = proc.wait()
    if code != 0:
        raise StackError(
            f"`{' '.join(argv)}` failed with exit code {code}; full log: {log_file}\n"
            f"{tail(log_file)}"
        )
