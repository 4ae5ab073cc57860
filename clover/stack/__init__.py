"""The local stack: real ZooKeeper, Kafka, Cassandra, etcd, kube-apiserver and
kube-controller-manager on loopback, plus BCC prepared for the eBPF collectors.

``clover stack up`` installs what is missing (once, into the cache), starts what is not running,
and returns only when every server has answered a real request. ``down`` stops, by recorded PID,
only what this stack started.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from clover.config import Settings
from clover.stack import install, process
from clover.stack.kube import KubeApiserver, KubeControllerManager, bootstrap_pipeline_identity
from clover.stack.process import StackError
from clover.stack.progress import say, step
from clover.stack.servers import Cassandra, Etcd, Kafka, Paths, Server, ZooKeeper

__all__ = ["Stack", "StackError", "ServerStatus"]

# Servers start in waves: each wave needs the one before it to answer.
WAVES: tuple[tuple[type[Server], ...], ...] = (
    (ZooKeeper, Cassandra, Etcd),
    (Kafka, KubeApiserver),
    (KubeControllerManager,),
)


@dataclass(frozen=True)
class ServerStatus:
    name: str
    version: str
    ports: tuple[int, ...]
    pid: int | None
    healthy: bool
    health: str
    rss_mb: float | None = None


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.paths = Paths(settings.stack.home, settings.stack.cache_dir)
        self.servers: dict[str, Server] = {
            cls.name: cls(settings, self.paths) for wave in WAVES for cls in wave
        }

    # -- up -------------------------------------------------------------------------------
    def up(self, record: Path | None = None) -> list[str]:
        """Install and start every server; return the names of those this call started.

        With ``record``, each started server's name is appended to that file as soon as it
        starts, so whoever called ``up`` can stop exactly those, even after a failure.
        """
        for directory in (self.paths.home, self.paths.cache, self.paths.run, self.paths.logs):
            directory.mkdir(parents=True, exist_ok=True)
        install.ensure_debian_packages(self.paths.logs)
        for server in self.servers.values():
            server.install()
        self.prepare_bcc()
        # Every port is checked before anything starts, so a conflict leaves nothing half-up.
        for name, server in self.servers.items():
            if process.read_pid(self.paths.pid_file(name)) is None:
                self._check_ports(server)
        started: list[str] = []
        for wave in WAVES:
            names = [cls.name for cls in wave]
            for name in names:
                if self._start(self.servers[name]):
                    started.append(name)
                    if record is not None:
                        with open(record, "a") as f:
                            f.write(f"{name}\n")
            for name in names:
                self._wait_ready(self.servers[name])
        with step("granting the pipeline's ServiceAccount its Role and writing its kubeconfig"):
            apiserver = self.servers["kube-apiserver"]
            assert isinstance(apiserver, KubeApiserver)
            bootstrap_pipeline_identity(
                apiserver.admin_kubeconfig, Path(self.settings.kubeconfig), apiserver.pki.ca_crt,
                self.settings.kubernetes.namespace, self.settings.kubernetes.service_account,
            )
        say(f"stack is up ({len(started)} started, {len(self.servers) - len(started)} were "
            f"already running); admin kubeconfig: {apiserver.admin_kubeconfig}")
        return started

    def prepare_bcc(self) -> None:
        """Kernel headers, tracefs and Debian's BCC for the eBPF collectors (root only)."""
        if os.geteuid() != 0:
            say("    eBPF needs root: skipping BCC preparation (the collectors will say so)")
            return
        install.ensure_kernel_headers(self.paths.cache, self.paths.logs)
        install.ensure_tracefs()
        install.ensure_bcc_importable()

    def _check_ports(self, server: Server) -> None:
        for port in server.ports:
            owner = process.port_owner(port)
            if owner is not None:
                key = _port_setting(server.name, port, self.settings)
                raise StackError(
                    f"port {port}, needed by {server.name}, is already taken by {owner}. "
                    f"Stop that process, or give {server.name} another port with "
                    f"CLOVER_STACK_{key.upper()} (or [stack] {key} in the config file)."
                )

    def _start(self, server: Server) -> bool:
        pid_file = self.paths.pid_file(server.name)
        if process.read_pid(pid_file) is not None:
            return False
        self._check_ports(server)
        server.configure()
        record = process.start(server.argv(), pid_file=pid_file, cwd=self.paths.home,
                               log_file=self.paths.log_file(server.name), env=server.env())
        say(f"==> started {server.name} {server.version} (PID {record.pid}) on port "
            f"{', '.join(map(str, server.ports))}")
        return True

    def _wait_ready(self, server: Server) -> None:
        started = time.monotonic()
        deadline = started + self.settings.stack.ready_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            record = process.read_pid(self.paths.pid_file(server.name))
            if record is None:
                raise StackError(
                    f"{server.name} exited during start-up; last lines of "
                    f"{self.paths.log_file(server.name)}:\n"
                    f"{process.tail(self.paths.log_file(server.name))}"
                )
            try:
                health = server.check(timeout=2.0)
                say(f"    {server.name} ready in {time.monotonic() - started:.1f}s: {health}")
                return
            except Exception as exc:  # not answering yet: any failure of the probe means retry
                last_error = exc
                time.sleep(0.25)
        raise StackError(
            f"{server.name} did not answer within {self.settings.stack.ready_timeout_s}s "
            f"(last error: {last_error}); log: {self.paths.log_file(server.name)}\n"
            f"{process.tail(self.paths.log_file(server.name))}"
        )

    # -- down -----------------------------------------------------------------------------
    def down(self, only: list[str] | None = None) -> list[str]:
        """Stop servers this stack started (all, or those named), in reverse start order."""
        stopped = []
        for name in reversed(list(self.servers)):
            if only is not None and name not in only:
                continue
            if process.stop(self.paths.pid_file(name)):
                say(f"stopped {name}")
                stopped.append(name)
        return stopped

    # -- status ---------------------------------------------------------------------------
    def status(self, timeout: float = 2.0) -> list[ServerStatus]:
        rows = []
        for name, server in self.servers.items():
            record = process.read_pid(self.paths.pid_file(name))
            if record is None:
                rows.append(ServerStatus(name, server.version, server.ports, None, False,
                                         "not running"))
                continue
            try:
                health, healthy = server.check(timeout=timeout), True
            except Exception as exc:  # a status report shows the failure instead of raising
                health, healthy = f"not answering: {exc}".splitlines()[0][:120], False
            rows.append(ServerStatus(name, server.version, server.ports, record.pid, healthy,
                                     health, process.rss_mb(record)))
        rows.append(self._bcc_status())
        return rows

    def _bcc_status(self) -> ServerStatus:
        problems = []
        headers = install.kernel_headers_dir(self.paths.cache)
        if headers is None:
            problems.append("no kernel headers (run `clover stack up` as root)")
        if not (install.TRACEFS / "events").is_dir():
            problems.append(f"tracefs not mounted at {install.TRACEFS}")
        if not Path("/sys/kernel/btf/vmlinux").exists():
            problems.append("the kernel has no BTF")
        if os.geteuid() != 0:
            problems.append("not root")
        version = "?"
        try:
            import bcc

            version = getattr(bcc, "__version__", "?")
        except ImportError:
            problems.append("python module bcc not importable")
        if problems or headers is None:
            return ServerStatus("bcc", version, (), None, False, "; ".join(problems))
        return ServerStatus("bcc", version, (), None, True,
                            f"prepared (headers {headers.name}, tracefs, BTF)")

    def log_file(self, name: str) -> Path:
        if name not in self.servers:
            raise StackError(f"no server named {name!r}; servers: {', '.join(self.servers)}")
        return self.paths.log_file(name)


def _port_setting(server: str, port: int, settings: Settings) -> str:
    """The [stack] key that sets this port, for the error message."""
    for key, value in vars(settings.stack).items():
        if key.endswith("_port") and value == port:
            return key
    return f"{server.replace('-', '_')}_port"
