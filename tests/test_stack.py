"""The stack manager: every server starts from nothing and answers; up is idempotent; down
stops only what it started; a taken port is a clear error.

These start a second, throw-away stack in a temporary home on other ports, sharing only the
install cache with the stack `make test` runs, which must stay healthy throughout.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from clover.config import Settings, StackSettings
from clover.stack import Stack, StackError, process

# Ports of the throw-away stack: the main stack's plus 10000 (or 20000 where that overflows).
_SHIFTED = {
    "zookeeper_port": 12181, "kafka_port": 19092, "cassandra_port": 19042,
    "cassandra_storage_port": 17000, "etcd_port": 33790, "etcd_peer_port": 33800,
    "apiserver_port": 16443, "controller_manager_port": 20257,
}


_PORT_KEY = {"zookeeper": "zookeeper_port", "kafka": "kafka_port", "cassandra": "cassandra_port",
             "etcd": "etcd_port", "kube-apiserver": "apiserver_port",
             "kube-controller-manager": "controller_manager_port"}


def _other_stack_settings(settings: Settings, home: Path, **ports: int) -> Settings:
    stack = dataclasses.replace(settings.stack, home=home, cache=settings.stack.cache_dir,
                                **{**_SHIFTED, **ports})
    return dataclasses.replace(settings, stack=stack)


@pytest.fixture(scope="module")
def fresh_stack(live_stack: Stack, settings: Settings,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, list[str]]]:
    other = Stack(_other_stack_settings(settings, tmp_path_factory.mktemp("clover-home")))
    try:
        started = other.up()
        yield other, started
    finally:
        other.down()


def test_every_server_starts_from_nothing_and_answers(fresh_stack) -> None:
    stack, started = fresh_stack
    assert sorted(started) == sorted(stack.servers)
    rows = {row.name: row for row in stack.status()}
    for name in stack.servers:
        row = rows[name]
        assert row.healthy, f"{name}: {row.health}"
        assert row.pid is not None and psutil.pid_exists(row.pid)
        assert row.ports[0] == _SHIFTED[_PORT_KEY[name]]
    # The health lines come from real answers of each server.
    assert "CQL answers (release 2.1.0)" in rows["cassandra"].health
    assert "1 broker" in rows["kafka"].health
    assert "v1.20.2" in rows["kube-apiserver"].health
    assert "etcd 3.4" in rows["etcd"].health
    # A pipeline kubeconfig for this stack's own API server was written.
    kubeconfig = Path(stack.settings.kubeconfig).read_text()
    assert f"https://127.0.0.1:{_SHIFTED['apiserver_port']}" in kubeconfig


def test_up_twice_is_harmless(fresh_stack) -> None:
    stack, _ = fresh_stack
    pids = {row.name: row.pid for row in stack.status()}
    assert stack.up() == []
    assert {row.name: row.pid for row in stack.status()} == pids


def test_a_taken_port_names_the_port_and_the_process(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        stack = Stack(_other_stack_settings(settings, tmp_path, zookeeper_port=port,
                                            kafka_port=29092))
        with pytest.raises(StackError) as error:
            stack.up()
    message = str(error.value)
    assert f"port {port}, needed by zookeeper" in message
    assert f"PID {psutil.Process().pid}" in message
    assert "CLOVER_STACK_ZOOKEEPER_PORT" in message
    # Nothing was started.
    assert not any(row.pid for row in stack.status())


def test_down_stops_only_what_it_started(live_stack: Stack, settings: Settings,
                                         tmp_path: Path) -> None:
    stack = Stack(_other_stack_settings(settings, tmp_path))
    # A PID file naming a process this stack did not start (a recycled PID): not ours.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        stack.paths.run.mkdir(parents=True)
        stack.paths.pid_file("etcd").write_text(json.dumps(
            {"pid": bystander.pid, "create_time": psutil.Process(bystander.pid).create_time()
             - 1000}))
        assert stack.down() == []
        # The same with the start time in ticks after boot that PID files now record.
        stack.paths.pid_file("etcd").write_text(json.dumps(
            {"pid": bystander.pid, "create_time": 0.0,
             "start_ticks": (process.start_ticks(bystander.pid) or 0) - 1}))
        assert stack.down() == []
        assert bystander.poll() is None, "down killed a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
    # The main stack was not touched either.
    assert all(row.healthy for row in live_stack.status() if row.name != "bcc")


def test_down_by_pid(settings: Settings, tmp_path: Path) -> None:
    """down sends SIGTERM to exactly the recorded PID and removes the PID file."""
    stack = Stack(_other_stack_settings(settings, tmp_path))
    record = process.start(["sleep", "60"], pid_file=stack.paths.pid_file("etcd"),
                           log_file=stack.paths.log_file("etcd"), cwd=tmp_path)
    assert stack.down() == ["etcd"]
    assert not psutil.pid_exists(record.pid) or psutil.Process(record.pid).status() == "zombie"
    assert not stack.paths.pid_file("etcd").exists()


def test_status_command_lists_version_port_pid_and_health(live_stack: Stack) -> None:
    out = subprocess.run([sys.executable, "-m", "clover.cli", "stack", "status"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["SERVER", "VERSION", "PORTS", "PID", "RSS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    expected = {"zookeeper": "3.8.0", "kafka": "2.3.0", "cassandra": "2.1.0", "etcd": "3.4",
                "kube-apiserver": "1.20.2", "kube-controller-manager": "1.20.2"}
    for name, version in expected.items():
        _, version_, ports, pid, _rss, mark, *_ = rows[name]
        assert version_ == version
        assert int(ports.split(",")[0]) == live_stack.servers[name].ports[0]
        assert psutil.pid_exists(int(pid))
        assert mark == "ok"


def test_state_directory_is_clover_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLOVER_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/data")
    assert StackSettings().home == Path("/srv/data/clover")
    monkeypatch.setenv("CLOVER_HOME", "/var/lib/clover")
    assert StackSettings().home == Path("/var/lib/clover")
    assert StackSettings().cache_dir == Path("/var/lib/clover/cache")


def test_logs_command_shows_a_server_log(live_stack: Stack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "clover.cli", "stack", "logs", "kafka", "-n", "5"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    log = live_stack.log_file("kafka").read_text().splitlines()
    assert out.stdout.splitlines() == log[-5:]
    assert any("KafkaServer" in line for line in log)
    unknown = subprocess.run([sys.executable, "-m", "clover.cli", "stack", "logs", "kafka2"],
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1
    assert "no server named 'kafka2'; servers: zookeeper, cassandra, etcd" in unknown.stderr
