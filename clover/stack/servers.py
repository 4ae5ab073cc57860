"""The servers of the local stack: how each is configured, started and proven to work.

Each server writes its own configuration under ``<home>/conf/<name>``, keeps its data under
``<home>/data/<name>``, logs to ``<home>/logs/<name>.log`` and is checked by a real request
(a Kafka metadata request, a CQL query, the API server's /readyz), never by a sleep.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from clover.config import Settings
from clover.stack import install
from clover.stack.process import StackError


@dataclass(frozen=True)
class Paths:
    """Where the stack keeps its state; everything under one home directory."""

    home: Path
    cache: Path

    @property
    def run(self) -> Path:
        return self.home / "run"

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    @property
    def pki(self) -> Path:
        return self.home / "pki"

    @property
    def kube(self) -> Path:
        return self.home / "kube"

    def conf(self, name: str) -> Path:
        return self.home / "conf" / name

    def data(self, name: str) -> Path:
        return self.home / "data" / name

    def pid_file(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"


class Server:
    """One server process. Subclasses say how to install, configure, start and check it."""

    name: str = ""
    version: str = ""

    def __init__(self, settings: Settings, paths: Paths) -> None:
        self.settings = settings
        self.stack = settings.stack
        self.paths = paths

    @property
    def ports(self) -> tuple[int, ...]:
        """Every port the server listens on; the first is the one clients use."""
        raise NotImplementedError

    def install(self) -> None:
        """Install the software (cached); called before every start, so it must be cheap."""

    def configure(self) -> None:
        """Write configuration files and create directories."""

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def check(self, timeout: float) -> str:
        """Prove the server works with one real request; return a one-line health summary.

        Raises an exception when it does not answer (yet).
        """
        raise NotImplementedError


def _java_classpath(*entries: Path | str) -> str:
    return ":".join(str(e) for e in entries)


class _KafkaDistribution(Server):
    """ZooKeeper and Kafka share the Kafka distribution's classpath, with Debian's ZooKeeper."""

    @cached_property
    def kafka_home(self) -> Path:
        return self.paths.cache / f"kafka_2.12-{install.KAFKA_VERSION}"

    def install(self) -> None:
        install.ensure_kafka(self.paths.cache, self.paths.logs)

    def classpath(self) -> str:
        # ZooKeeper 3.4.14's client cannot connect on Java 14+ (ZOOKEEPER-3779); Debian's 3.8 can.
        libs = (self.kafka_home / "libs").glob("*.jar")
        jars = sorted(p for p in libs if not p.name.startswith("zookeeper-"))
        return _java_classpath(
            *jars, "/usr/share/java/zookeeper.jar", "/usr/share/java/zookeeper-jute.jar"
        )

    def write_log4j(self) -> Path:
        path = self.paths.conf(self.name) / "log4j.properties"
        path.write_text(
            "log4j.rootLogger=INFO, stdout\n"
            "log4j.appender.stdout=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.stdout.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.logger.state.change.logger=WARN\n"
        )
        return path

    def java(self, heap_mb: int, main: str, *args: str) -> list[str]:
        return [
            "java", f"-Xmx{heap_mb}m", f"-Xms{min(heap_mb, 128)}m", "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{self.paths.conf(self.name) / 'log4j.properties'}",
            "-cp", self.classpath(), main, *args,
        ]


class ZooKeeper(_KafkaDistribution):
    name = "zookeeper"
    version = "3.8.0"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.stack.zookeeper_port,)

    def configure(self) -> None:
        conf = self.paths.conf(self.name)
        conf.mkdir(parents=True, exist_ok=True)
        self.paths.data(self.name).mkdir(parents=True, exist_ok=True)
        self.write_log4j()
        (conf / "zookeeper.properties").write_text(
            f"dataDir={self.paths.data(self.name)}\n"
            f"clientPort={self.stack.zookeeper_port}\n"
            "clientPortAddress=127.0.0.1\n"
            "maxClientCnxns=0\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,srvr\n"
        )

    def argv(self) -> list[str]:
        return self.java(
            256, "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            str(self.paths.conf(self.name) / "zookeeper.properties"),
        )

    def check(self, timeout: float) -> str:
        import socket

        with socket.create_connection(("127.0.0.1", self.stack.zookeeper_port), timeout) as s:
            s.sendall(b"srvr")
            reply = s.makefile("rb").read().decode()
        if "Mode:" not in reply:
            raise StackError(f"unexpected reply to srvr: {reply!r}")
        mode = next(line for line in reply.splitlines() if line.startswith("Mode:"))
        return f"serving ({mode.split(':', 1)[1].strip()})"


class Kafka(_KafkaDistribution):
    name = "kafka"
    version = install.KAFKA_VERSION

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.stack.kafka_port,)

    def configure(self) -> None:
        conf = self.paths.conf(self.name)
        conf.mkdir(parents=True, exist_ok=True)
        self.paths.data(self.name).mkdir(parents=True, exist_ok=True)
        self.write_log4j()
        listener = f"PLAINTEXT://127.0.0.1:{self.stack.kafka_port}"
        (conf / "server.properties").write_text(
            "broker.id=0\n"
            f"listeners={listener}\n"
            f"advertised.listeners={listener}\n"
            f"log.dirs={self.paths.data(self.name)}\n"
            f"zookeeper.connect=127.0.0.1:{self.stack.zookeeper_port}\n"
            "num.partitions=6\n"
            # Topics are created explicitly (clover topics create); a typo must not make one.
            "auto.create.topics.enable=false\n"
            # A single broker: internal topics cannot be replicated.
            "offsets.topic.replication.factor=1\n"
            "transaction.state.log.replication.factor=1\n"
            "transaction.state.log.min.isr=1\n"
            "group.initial.rebalance.delay.ms=0\n"
            "log.retention.hours=168\n"
        )

    def argv(self) -> list[str]:
        return self.java(
            self.stack.kafka_heap_mb, "kafka.Kafka",
            str(self.paths.conf(self.name) / "server.properties"),
        )

    def check(self, timeout: float) -> str:
        from confluent_kafka.admin import AdminClient

        # log_level 0: "connection refused" while the broker starts is expected, not news.
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{self.stack.kafka_port}",
                             "log_level": 0,
                             "socket.connection.setup.timeout.ms": int(timeout * 1000)})
        metadata = admin.list_topics(timeout=timeout)  # a real Metadata request
        if not metadata.brokers:
            raise StackError("the metadata response lists no broker")
        if metadata.controller_id < 0:
            raise StackError("no controller elected yet")
        return f"{len(metadata.brokers)} broker, {len(metadata.topics)} topics"


class Cassandra(Server):
    name = "cassandra"
    version = install.CASSANDRA_VERSION

    @cached_property
    def cassandra_home(self) -> Path:
        return self.paths.cache / f"apache-cassandra-{install.CASSANDRA_VERSION}"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.stack.cassandra_port, self.stack.cassandra_storage_port)

    def install(self) -> None:
        install.ensure_cassandra(self.paths.cache, self.paths.logs)

    def configure(self) -> None:
        conf = self.paths.conf(self.name)
        conf.mkdir(parents=True, exist_ok=True)
        data = self.paths.data(self.name)
        for sub in ("data", "commitlog", "saved_caches"):
            (data / sub).mkdir(parents=True, exist_ok=True)
        (conf / "cassandra.yaml").write_text(
            "cluster_name: clover-local\n"
            "num_tokens: 1\n"
            "partitioner: org.apache.cassandra.dht.Murmur3Partitioner\n"
            "endpoint_snitch: SimpleSnitch\n"
            "seed_provider:\n"
            "  - class_name: org.apache.cassandra.locator.SimpleSeedProvider\n"
            "    parameters:\n"
            '      - seeds: "127.0.0.1"\n'
            "listen_address: 127.0.0.1\n"
            "rpc_address: 127.0.0.1\n"
            f"storage_port: {self.stack.cassandra_storage_port}\n"
            "start_native_transport: true\n"
            f"native_transport_port: {self.stack.cassandra_port}\n"
            "start_rpc: false\n"
            f"data_file_directories:\n  - {data / 'data'}\n"
            f"commitlog_directory: {data / 'commitlog'}\n"
            f"saved_caches_directory: {data / 'saved_caches'}\n"
            "commitlog_sync: periodic\n"
            "commitlog_sync_period_in_ms: 10000\n"
            "disk_failure_policy: stop\n"
            "authenticator: AllowAllAuthenticator\n"
            "authorizer: AllowAllAuthorizer\n"
        )
        (conf / "logback.xml").write_text(
            "<configuration>\n"
            '  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">\n'
            "    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>"
            "</encoder>\n"
            "  </appender>\n"
            '  <root level="INFO"><appender-ref ref="STDOUT"/></root>\n'
            "</configuration>\n"
        )

    def _java_base_packages(self) -> list[str]:
        """Every package of java.base: Cassandra 2.1 reaches into JDK internals on Java 17."""
        cached = self.paths.conf(self.name) / "java-base-packages.txt"
        if not cached.exists():
            out = subprocess.run(["java", "--describe-module", "java.base"],
                                 capture_output=True, text=True, check=True).stdout
            packages = sorted({line.split()[1] for line in out.splitlines()
                               if line.startswith(("exports ", "contains "))})
            cached.write_text("\n".join(packages))
        return cached.read_text().split()

    def argv(self) -> list[str]:
        home = self.cassandra_home
        conf = self.paths.conf(self.name)
        opens = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in self._java_base_packages()]
        return [
            "java", f"-Xmx{self.stack.cassandra_heap_mb}m", f"-Xms{self.stack.cassandra_heap_mb}m",
            "-Xss512k", "-XX:+UseG1GC", "-Djava.awt.headless=true",
            f"-javaagent:{home / 'lib' / 'jamm-0.2.6.jar'}",
            *opens,
            # Without these two PREPARE fails on Java 17.
            "--add-exports=java.base/jdk.internal.misc=ALL-UNNAMED",
            "--add-exports=java.base/jdk.internal.ref=ALL-UNNAMED",
            "-Dcassandra-foreground=yes",
            f"-Dcassandra.config=file://{conf / 'cassandra.yaml'}",
            f"-Dlogback.configurationFile={conf / 'logback.xml'}",
            f"-Dcassandra.logdir={self.paths.logs}",
            "-cp", _java_classpath(conf, *sorted((home / "lib").glob("*.jar"))),
            "org.apache.cassandra.service.CassandraDaemon",
        ]

    def check(self, timeout: float) -> str:
        from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
        from cassandra.policies import RoundRobinPolicy

        # While the node starts, refused connections are expected: keep the driver's
        # tracebacks about them out of the terminal.
        driver_log = logging.getLogger("cassandra")
        level = driver_log.level
        driver_log.setLevel(logging.CRITICAL)
        cluster = Cluster(["127.0.0.1"], port=self.stack.cassandra_port, protocol_version=3,
                          execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(
                              load_balancing_policy=RoundRobinPolicy(), request_timeout=timeout)},
                          connect_timeout=timeout, control_connection_timeout=timeout)
        try:
            session = cluster.connect()
            row = session.execute("SELECT release_version FROM system.local").one()
            return f"CQL answers (release {row.release_version})"
        finally:
            cluster.shutdown()
            driver_log.setLevel(level)


def _http_json(url: str, timeout: float, *, token: str | None = None,
               context: ssl.SSLContext | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return response.status, response.read().decode()


class Etcd(Server):
    name = "etcd"
    version = "3.4"

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.stack.etcd_port, self.stack.etcd_peer_port)

    def argv(self) -> list[str]:
        client = f"http://127.0.0.1:{self.stack.etcd_port}"
        peer = f"http://127.0.0.1:{self.stack.etcd_peer_port}"
        return [
            "etcd", "--name", "clover", "--data-dir", str(self.paths.data(self.name)),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"clover={peer}",
            # A local development store: durability across a power cut is not worth the fsyncs.
            "--unsafe-no-fsync",
        ]

    def check(self, timeout: float) -> str:
        base = f"http://127.0.0.1:{self.stack.etcd_port}"
        _, body = _http_json(f"{base}/health", timeout)
        if json.loads(body).get("health") != "true":
            raise StackError(f"etcd reports {body}")
        _, version = _http_json(f"{base}/version", timeout)
        return f"healthy (etcd {json.loads(version)['etcdserver']})"
