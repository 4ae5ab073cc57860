"""The ``clover`` command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clover.config import ConfigError, Settings, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        settings = load_settings(args.config)
        return int(args.run(settings, args) or 0)
    except ConfigError as exc:
        print(f"clover: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # Known operational failures print their message, not a traceback.
        from clover.stack import StackError
        from collectors.environment import CollectorError

        if isinstance(exc, StackError | CollectorError | ConnectionError | TimeoutError):
            print(f"clover: {exc}", file=sys.stderr)
            return 1
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clover",
        description="Clover: telemetry analytics and automated rollback for service meshes.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="TOML configuration file (default: $CLOVER_CONFIG; see README)")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    stack = commands.add_parser("stack", help="the local stack of real servers")
    stack_commands = stack.add_subparsers(title="stack commands", metavar="ACTION",
                                          required=True)
    up = stack_commands.add_parser("up", help="install (once) and start every server")
    up.add_argument("--record", metavar="FILE", type=Path,
                    help="append the names of the servers this call started to FILE")
    up.set_defaults(run=_stack_up)
    down = stack_commands.add_parser("down", help="stop the servers this stack started")
    down.add_argument("--recorded", metavar="FILE", type=Path,
                      help="stop only the servers named in FILE (written by up --record)")
    down.set_defaults(run=_stack_down)
    status = stack_commands.add_parser("status", help="each server's version, port, PID, health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=_stack_status)
    logs = stack_commands.add_parser("logs", help="show a server's log")
    logs.add_argument("server", nargs="?", help="server name (default: list the log files)")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.set_defaults(run=_stack_logs)

    topics = commands.add_parser("topics", help="Clover's Kafka topics")
    topic_commands = topics.add_subparsers(title="topic commands", metavar="ACTION",
                                           required=True)
    create = topic_commands.add_parser("create", help="create the topics that are missing")
    create.set_defaults(run=_topics_create)

    collect = commands.add_parser("collect", help="eBPF collectors (root)")
    collect_commands = collect.add_subparsers(title="collectors", metavar="COLLECTOR",
                                              required=True)
    flows = collect_commands.add_parser(
        "flows", help="TCP connections (and, with --iface, per-5-tuple packet counters) to "
                      "clover.flows")
    flows.add_argument("--iface", action="append", default=[], metavar="IFACE",
                       help="also count packets per 5-tuple on this interface (repeatable)")
    flows.add_argument("--netns", metavar="NAME",
                       help="the --iface interfaces are in this network namespace (ip netns)")
    flows.add_argument("--http", action="store_true",
                       help="also read plaintext HTTP/1.x exchanges on the --iface interfaces "
                            "into server spans on clover.spans")
    flows.add_argument("--duration", type=_positive_seconds, metavar="SECONDS",
                       help="stop after this long (default: until SIGTERM or Ctrl-C)")
    flows.set_defaults(run=_collect_flows)

    receive = commands.add_parser("receive", help="mesh telemetry receivers")
    receive_commands = receive.add_subparsers(title="receivers", metavar="WHAT", required=True)
    spans = receive_commands.add_parser(
        "spans", help="Mixer adapter, OTLP/gRPC and Zipkin receivers, publishing to clover.spans "
                      "(ports in [receivers]; 0 turns one off)")
    spans.add_argument("--duration", type=_positive_seconds, metavar="SECONDS",
                       help="stop after this long (default: until SIGTERM or Ctrl-C)")
    spans.set_defaults(run=_receive_spans)

    replay = commands.add_parser("replay", help="replay recorded telemetry into Clover")
    replay_commands = replay.add_subparsers(title="what", metavar="WHAT", required=True)
    replay_spans = replay_commands.add_parser(
        "spans", help="replay Jaeger JSON exports or Nezha span CSV files (plain or gzipped) "
                      "into clover.spans")
    replay_spans.add_argument("files", nargs="+", type=Path, metavar="FILE")
    pace = replay_spans.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive_factor, default=1.0, metavar="FACTOR",
                      help="keep the recorded inter-arrival times, divided by FACTOR "
                           "(default 1: real time)")
    pace.add_argument("--as-fast-as-possible", action="store_true",
                      help="ignore the recorded timing")
    replay_spans.add_argument("--namespace", help="Kubernetes namespace of the recorded "
                              "services, when the files do not say")
    replay_spans.set_defaults(run=_replay_spans)

    stream = commands.add_parser("stream", help="stream workers")
    stream_commands = stream.add_subparsers(title="stream commands", metavar="ACTION",
                                            required=True)
    worker = stream_commands.add_parser(
        "worker", help="aggregate clover.flows and clover.spans into per-service windows "
        "(Cassandra and clover.service-metrics); run several to share the partitions")
    worker.add_argument("--loglevel", default="info",
                        choices=("debug", "info", "warning", "error"))
    worker.set_defaults(run=_stream_worker)

    rollback = commands.add_parser("rollback", help="anomaly-driven rollback of Deployments")
    rollback_commands = rollback.add_subparsers(title="rollback commands", metavar="ACTION",
                                                required=True)
    agent = rollback_commands.add_parser(
        "agent", help="consume clover.anomalies and roll bad rollouts back (policy in "
        "[rollback]); every decision goes to clover.rollbacks, Cassandra and a Kubernetes Event")
    agent.add_argument("--dry-run", action="store_true",
                       help="decide and record, but never patch a Deployment")
    agent.add_argument("--anomalies-topic", default="clover.anomalies", metavar="TOPIC",
                       help="read verdicts from TOPIC instead (e.g. a replay, with --dry-run)")
    agent.add_argument("--decisions-topic", default="clover.rollbacks", metavar="TOPIC",
                       help="write decisions to TOPIC instead")
    agent.set_defaults(run=_rollback_agent)

    models = commands.add_parser("models", help="anomaly detection: train, score, evaluate")
    model_commands = models.add_subparsers(title="what", metavar="ACTION", required=True)
    train = model_commands.add_parser(
        "train", help="train the anomaly model on service-metric history in Cassandra")
    train.add_argument("--since", required=True, metavar="TIME",
                       help="start of the training range (ISO 8601, UTC unless it says)")
    train.add_argument("--until", metavar="TIME", help="end of the range (default: now)")
    train.add_argument("--service", action="append", required=True, metavar="NS/SERVICE",
                       help="a service to learn, as namespace/service (repeatable)")
    train.add_argument("--output", type=Path, metavar="FILE",
                       help="model file (default: [models] model_path)")
    train.set_defaults(run=_models_train)
    score = model_commands.add_parser(
        "score", help="score a NAB-format series (timestamp,value) without look-ahead")
    score.add_argument("--input", required=True, type=Path, metavar="CSV")
    score.add_argument("--output", required=True, type=Path, metavar="CSV",
                       help="the input's columns plus anomaly_score")
    score.set_defaults(run=_models_score)
    evaluate = model_commands.add_parser(
        "evaluate", help="NAB sample and Nezha OnlineBoutique results of the detectors")
    evaluate.add_argument("--data", type=Path, metavar="DIR",
                          help="the shared data directory (default: [models] data_dir, "
                               "else ../shared/data)")
    evaluate.set_defaults(run=_models_evaluate)
    agent = model_commands.add_parser(
        "agent", help="score each window of clover.service-metrics into clover.anomalies and "
        "Cassandra (model: [models] model_path, else learn online)")
    agent.add_argument("--metrics-topic", default="clover.service-metrics", metavar="TOPIC",
                       help="read service windows from TOPIC instead")
    agent.add_argument("--anomalies-topic", default="clover.anomalies", metavar="TOPIC",
                       help="write verdicts to TOPIC instead")
    agent.add_argument("--loglevel", default="info",
                       choices=("debug", "info", "warning", "error"))
    agent.set_defaults(run=_models_agent)

    smoke = commands.add_parser(
        "smoke", help="send records through Kafka into Cassandra and print what arrived")
    smoke.add_argument("--count", type=int, default=12, help="service-metrics records to send")
    smoke.set_defaults(run=_smoke)

    demo = commands.add_parser(
        "demo", help="a real local mesh, a bad rollout, detected and rolled back by the "
        "pipeline (needs the local stack: `clover stack up`)")
    demo.add_argument("--service", default="payment",
                      help="the service that gets the new release: frontend, cart, catalog, "
                           "checkout or payment (default payment)")
    demo.add_argument("--fault", default="latency", choices=("latency", "errors"),
                      help="what the faulty release does (default latency)")
    demo.add_argument("--healthy", action="store_true",
                      help="roll out a harmless release instead: nothing should be rolled back")
    demo.add_argument("--duration", type=_positive_seconds, default=90.0, metavar="SECONDS",
                      help="the longest to watch after the rollout (default 90)")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave the mesh and the pipeline running until Ctrl-C")
    demo.add_argument("--namespace", default="clover-demo",
                      help="Kubernetes namespace of the mesh (default clover-demo; replaced if "
                           "it exists)")
    demo.set_defaults(run=_demo)
    return parser


def _positive(what: str) -> Any:
    """An argparse type: a number > 0; the error says ``what`` was expected."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}")
        return value

    return parse


_positive_seconds = _positive("a number of seconds")
_positive_factor = _positive("a factor (e.g. 10 for ten times faster)")


def _receive_spans(settings: Settings, args: argparse.Namespace) -> int:
    import logging
    import threading

    from collectors.receivers import receive_spans
    from collectors.signals import stop_on_signals

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    restore = stop_on_signals(stop)
    if args.duration:
        threading.Timer(args.duration, stop.set).start()
    try:
        undelivered = receive_spans(settings, stop=stop)
    finally:
        restore()
    if undelivered:
        print(f"clover: {undelivered} records were not delivered to Kafka", file=sys.stderr)
    return 0 if undelivered == 0 else 1


def _replay_spans(settings: Settings, args: argparse.Namespace) -> int:
    from clover.kafka import admin_client
    from collectors.ingest import SpanSink
    from collectors.replay import ReplayFormatError, replay_spans

    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"clover: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    admin_client(settings)
    sink = SpanSink(settings)
    try:
        stats = replay_spans(sink, args.files, namespace=args.namespace,
                             speed=None if args.as_fast_as_possible else args.speed)
    except ReplayFormatError as exc:
        print(f"clover: {exc}", file=sys.stderr)
        return 2
    finally:
        undelivered = sink.close()
    print(f"replayed {stats.files} files: {stats.accepted} spans published, {stats.rejected} "
          f"dead-lettered, {stats.duplicates} repeated spans skipped, in "
          f"{stats.wall_seconds:.1f}s")
    for service, count in sorted(stats.per_service.items()):
        print(f"  {service:<28} {count}")
    return 0 if undelivered == 0 else 1


def _collect_flows(settings: Settings, args: argparse.Namespace) -> int:
    import logging

    from collectors.flows import collect_flows

    if args.http and not args.iface:
        print("clover: --http reads HTTP on the packet counter's interfaces: name at least one "
              "with --iface (e.g. a pod's veth)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = collect_flows(settings, interfaces=args.iface, netns=args.netns,
                            duration_s=args.duration, http=args.http)
    print(f"published {summary.published} flow records; {summary.delivery_errors} delivery "
          f"errors (retried); {summary.undelivered} undelivered; {summary.lost} kernel events "
          "lost" + (f"; {summary.http_spans} HTTP spans" if args.http else ""))
    return 0 if summary.undelivered == 0 else 1


def _stack_up(settings: Settings, args: argparse.Namespace) -> int:
    from clover.stack import Stack

    Stack(settings).up(record=args.record)
    return 0


def _stack_down(settings: Settings, args: argparse.Namespace) -> int:
    from clover.stack import Stack

    only = None
    if args.recorded:
        only = args.recorded.read_text().split() if args.recorded.exists() else []
    stopped = Stack(settings).down(only)
    print(f"stopped {len(stopped)} server(s)" + (f": {', '.join(stopped)}" if stopped else ""))
    return 0


def _stack_status(settings: Settings, args: argparse.Namespace) -> int:
    from clover.stack import Stack

    rows = Stack(settings).status()
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
    else:
        header = f"{'SERVER':<24} {'VERSION':<8} {'PORTS':<12} {'PID':>7} {'RSS MB':>7}  HEALTH"
        print(header)
        for row in rows:
            ports = ",".join(map(str, row.ports)) or "-"
            pid = str(row.pid) if row.pid else "-"
            rss = f"{row.rss_mb:.0f}" if row.rss_mb else "-"
            mark = "ok  " if row.healthy else "FAIL"
            print(f"{row.name:<24} {row.version:<8} {ports:<12} {pid:>7} {rss:>7}  "
                  f"{mark} {row.health}")
    return 0 if all(row.healthy for row in rows if row.name != "bcc") else 1


def _stack_logs(settings: Settings, args: argparse.Namespace) -> int:
    from clover.stack import Stack

    stack = Stack(settings)
    if not args.server:
        for name in stack.servers:
            print(f"{name:<24} {stack.log_file(name)}")
        return 0
    log = stack.log_file(args.server)
    if not log.exists():
        print(f"clover: {args.server} has no log yet ({log})", file=sys.stderr)
        return 1
    tail = ["tail", "-n", str(args.lines), *(["-F"] if args.follow else []), str(log)]
    return subprocess.call(tail)


def _topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from clover.kafka import admin_client
    from clover.topics import create_topics

    result = create_topics(admin_client(settings),
                           replication_factor=settings.kafka.replication_factor)
    for name, outcome in result.items():
        print(f"{name:<28} {outcome}")
    return 0


def _stream_worker(settings: Settings, args: argparse.Namespace) -> int:
    from streams.aggregate import run_worker

    return run_worker(settings, loglevel=args.loglevel)


def _rollback_agent(settings: Settings, args: argparse.Namespace) -> int:
    from streams.rollback import run_agent

    return run_agent(settings, dry_run=args.dry_run, anomalies_topic=args.anomalies_topic,
                     decisions_topic=args.decisions_topic)


def _models_train(settings: Settings, args: argparse.Namespace) -> int:
    import time

    import pandas as pd

    from analytics.store import connect
    from analytics.views import load_service_metrics
    from models import persistence
    from models.train import TrainingError, train_model

    try:
        since = pd.Timestamp(args.since)
        until = pd.Timestamp(args.until) if args.until else pd.Timestamp.now(tz="UTC")
    except ValueError as exc:
        print(f"clover: --since/--until: {exc}; write a time like 2024-05-01T12:00Z",
              file=sys.stderr)
        return 2
    since, until = (t if t.tzinfo else t.tz_localize("UTC") for t in (since, until))
    if since >= until:
        print(f"clover: --since {since} is not before --until {until}", file=sys.stderr)
        return 2
    with connect(settings) as store:
        try:
            frame = load_service_metrics(store, args.service, since, until)
        except ValueError as exc:
            print(f"clover: --service: {exc}", file=sys.stderr)
            return 2
    frame["window_start_us"] = frame["window_start"].astype("int64") // 1000 \
        if len(frame) else pd.Series(dtype="int64")
    models = settings.models
    try:
        model, features = train_model(frame, threshold=models.threshold,
                                      baseline_windows=models.baseline_windows,
                                      min_windows=models.min_windows)
    except TrainingError as exc:
        print(f"clover: {exc}", file=sys.stderr)
        return 1
    path = args.output or settings.model_path
    persistence.save(model, path, training_start_us=int(since.value // 1000),
                     training_end_us=int(until.value // 1000),
                     training_windows=len(features), created_us=time.time_ns() // 1000)
    print(f"trained on {len(features)} windows of {len(model.services_)} services "
          f"({', '.join(model.services_)}), {since} to {until}; saved to {path} "
          f"(metadata {persistence.metadata_path(path)})")
    return 0


def _models_score(settings: Settings, args: argparse.Namespace) -> int:
    from models.nab import (
        SeriesFormatError,
        StreamingScorer,
        read_series,
        rows_per_day,
        score_csv,
    )

    if not args.input.is_file():
        print(f"clover: --input {args.input}: no such file", file=sys.stderr)
        return 2
    try:
        period = rows_per_day(read_series(args.input)["timestamp_parsed"])
        rows = score_csv(args.input, args.output, StreamingScorer(
            threshold=settings.models.series_threshold, period=period))
    except SeriesFormatError as exc:
        print(f"clover: {exc}", file=sys.stderr)
        return 2
    print(f"scored {rows} rows of {args.input} into {args.output}")
    return 0


def _models_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from models import evaluate
    from models.online import OnlineScorer

    data = args.data or (Path(settings.models.data_dir) if settings.models.data_dir
                         else Path.cwd().parent / "shared" / "data")
    nab, nezha = data / "nab-sample", data / "nezha-onlineboutique-2022-08-22"
    if not nab.is_dir() and not nezha.is_dir():
        print(f"clover: neither {nab} nor {nezha} exists; pass --data DIR (the directory "
              "holding nab-sample/ and nezha-onlineboutique-2022-08-22/)", file=sys.stderr)
        return 2
    models = settings.models
    if nab.is_dir():
        files, score = evaluate.evaluate_nab(nab, models.series_threshold)
        print(evaluate.nab_report(files, score, models.series_threshold))
    if nezha.is_dir():
        scorer = OnlineScorer(threshold=models.threshold, min_windows=models.min_windows,
                              baseline_windows=models.baseline_windows,
                              min_requests=models.min_requests,
                              relearn_after=models.relearn_after)
        print(evaluate.nezha_report(evaluate.evaluate_nezha(nezha, scorer)))
    return 0


def _models_agent(settings: Settings, args: argparse.Namespace) -> int:
    from models.persistence import ModelFileError
    from streams.score import run_agent

    try:
        return run_agent(settings, metrics_topic=args.metrics_topic,
                         anomalies_topic=args.anomalies_topic, loglevel=args.loglevel)
    except ModelFileError as exc:
        print(f"clover: {exc}", file=sys.stderr)
        return 2


def _smoke(settings: Settings, args: argparse.Namespace) -> int:
    from streams.smoke import run_smoke

    return run_smoke(settings, count=args.count)


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    from demo.scenario import DemoError, DemoOptions, run_demo

    options = DemoOptions(service=args.service, fault=args.fault, healthy=args.healthy,
                          duration_s=args.duration, keep_running=args.keep_running,
                          namespace=args.namespace)
    try:
        options.check()
    except DemoError as exc:
        print(f"clover demo: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_demo(settings, options, say=lambda line: print(line, flush=True))
    except DemoError as exc:
        print(f"clover demo: {exc}", file=sys.stderr)
        return 1
    wanted = 0 if args.healthy else 1
    return 0 if len(report.rollbacks()) == wanted else 1


if __name__ == "__main__":
    sys.exit(main())
