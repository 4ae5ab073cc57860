"""Configuration: defaults, TOML file, environment overrides, and errors that say what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from clover.config import ConfigError, load_settings


def test_defaults_point_at_the_local_stack() -> None:
    settings = load_settings(environ={})
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert settings.cassandra_contact_points == ("127.0.0.1",)
    assert settings.cassandra_port == 9042
    assert settings.cassandra.protocol_version == 3
    assert settings.kubeconfig == str(settings.stack.home / "kube" / "pipeline.kubeconfig")


def test_local_addresses_follow_the_stack_ports() -> None:
    settings = load_settings(environ={"CLOVER_STACK_KAFKA_PORT": "19092",
                                      "CLOVER_STACK_CASSANDRA_PORT": "19042"})
    assert settings.kafka_bootstrap == "127.0.0.1:19092"
    assert settings.cassandra_port == 19042


def test_existing_servers_from_a_file_and_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "clover.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "kafka-0.kafka:9093,kafka-1.kafka:9093"\n'
        'replication_factor = 3\n'
        '[kafka.client]\n"security.protocol" = "SASL_SSL"\n"sasl.mechanism" = "PLAIN"\n'
        '[cassandra]\ncontact_points = ["cass-0", "cass-1"]\nport = 9142\nprotocol_version = 4\n'
        '[kubernetes]\nkubeconfig = "in-cluster"\nnamespace = "observability"\n'
    )
    settings = load_settings(config, environ={"CLOVER_CASSANDRA_KEYSPACE": "clover_prod"})
    assert settings.kafka_bootstrap == "kafka-0.kafka:9093,kafka-1.kafka:9093"
    assert settings.kafka.replication_factor == 3
    assert settings.kafka.client == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}
    assert settings.cassandra_contact_points == ("cass-0", "cass-1")
    assert settings.cassandra_port == 9142
    assert settings.cassandra.keyspace == "clover_prod"
    assert settings.kubeconfig == "in-cluster"
    assert settings.kubernetes.namespace == "observability"


def test_environment_beats_the_file(tmp_path: Path) -> None:
    config = tmp_path / "clover.toml"
    config.write_text('[cassandra]\ncontact_points = ["from-file"]\n')
    settings = load_settings(config, environ={"CLOVER_CASSANDRA_CONTACT_POINTS": "a, b"})
    assert settings.cassandra_contact_points == ("a", "b")


@pytest.mark.parametrize(("environ", "expected"), [
    ({"CLOVER_STACK_KAFKA_PORT": "90920"},
     r"stack\.kafka_port: got '90920' from environment variable CLOVER_STACK_KAFKA_PORT; "
     r"expected a TCP port from 1 to 65535"),
    ({"CLOVER_STACK_KAFKA_PORT": "ninety"}, r"stack\.kafka_port: got 'ninety'.*TCP port"),
    ({"CLOVER_CASSANDRA_PROTOCOL_VERSION": "2"},
     r"cassandra\.protocol_version: got '2' .*allowed: 3, 4, 5"),
    ({"CLOVER_KAFKA_REPLICATION_FACTOR": "0"}, r"kafka\.replication_factor: .*>= 1"),
    ({"CLOVER_CASSANDRA_TTL_DAYS": "-1"}, r"cassandra\.ttl_days: .*>= 0"),
])
def test_bad_environment_values_name_the_key_and_what_is_allowed(environ, expected) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_settings(environ=environ)


def test_bad_file_contents_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "clover.toml"
    config.write_text('[kafka]\nbootstrap = "x:9092"\n')
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bootstrap'\] in \[kafka\].*"
                                          r"allowed: \['bootstrap_servers'"):
        load_settings(config, environ={})
    config.write_text('[casandra]\nport = 1\n')
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['casandra'\]"):
        load_settings(config, environ={})
    config.write_text('[cassandra]\nport = "x"\n')
    with pytest.raises(ConfigError, match=r"cassandra\.port: got 'x' from \[cassandra\] port in"):
        load_settings(config, environ={})
    config.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(config, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_the_command_line_reports_a_bad_config_and_exits_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "clover.cli", "stack", "status"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "CLOVER_STACK_ETCD_PORT": "0"},
    )
    assert out.returncode == 2
    assert out.stderr.startswith("clover: configuration error: stack.etcd_port: got '0'")
    assert "Traceback" not in out.stderr


def test_the_command_line_rejects_unknown_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "clover.cli", "stack", "upp"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "invalid choice: 'upp'" in out.stderr


def test_booleans_and_numbers_are_parsed_and_bad_ones_named() -> None:
    from clover.config import _coerce

    assert _coerce("rollback", "dry_run", bool, "yes", "env") is True
    assert _coerce("rollback", "dry_run", bool, False, "file") is False
    assert _coerce("models", "threshold", float, "0.75", "env") == 0.75
    with pytest.raises(ConfigError, match="rollback.dry_run: got 'maybe'.*true or false"):
        _coerce("rollback", "dry_run", bool, "maybe", "env")
    with pytest.raises(ConfigError, match="models.threshold: got 'nan'.*finite"):
        _coerce("models", "threshold", float, "nan", "env")


def test_stream_settings_come_from_the_environment() -> None:
    settings = load_settings(environ={"CLOVER_STREAMS_WINDOW_SECONDS": "5"})
    assert settings.streams.window_seconds == 5
    with pytest.raises(ConfigError, match="streams.window_seconds"):
        load_settings(environ={"CLOVER_STREAMS_WINDOW_SECONDS": "0"})


def test_a_metrics_port_in_use_names_the_setting_and_the_fix() -> None:
    import socket

    from clover.metrics_endpoint import serve_metrics

    with socket.socket() as holder:  # a real listener holds the port
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as error:
            serve_metrics(port, "collectors.metrics_port")
    assert str(error.value) == (
        f"collectors.metrics_port: port {port} is already in use (another Clover process?); "
        "stop what holds it, or set CLOVER_COLLECTORS_METRICS_PORT to a free port, or to 0 for "
        "no metrics endpoint")
