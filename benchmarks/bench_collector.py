"""The TCP flow collector: records/s into Kafka per core of its own process, and what it costs
the traffic it watches (loopback bulk throughput and connection rate, with and without it),
measured two ways in the same run:

- **Throughput on/off.** A small C load generator (benchmarks/loadgen.c, built here with cc:
  no interpreter or GIL between the load and the kernel) runs client and server pinned to one
  CPU; the collector's process is pinned to another, as on a node with cores to spare. The BPF
  programs run in the context of the traffic, on the load's CPU, so what shows is their cost.
  Blocks of short rounds with the collector off and on alternate (off-on, on-off, ...); each
  pair of neighbouring blocks gives one on/off ratio, and the median and range of those ratios
  are reported, so a burst of other work on the machine moves one pair, not the result. On a
  shared machine a pair still varies by +-10-15%: this figure cannot resolve a few per cent,
  as the collector has to start (compile, load) between blocks.
- **Programs attached/detached.** The same BPF programs (collectors/tcp_flows.py) loaded once in
  this process, detached and attached between neighbouring rounds a fraction of a second apart,
  many pairs: the tightest figure for what the kernel side costs the traffic, dispatch and
  cache effects included (the collector's user space is on the other CPU either way).
- **In-kernel time** (kernel.bpf_stats_enabled, set for one block and restored): run_time_ns
  and run_cnt of the collector's own programs, per program run, per connection and per MB,
  beside the CPU time the load itself used (CLOCK_PROCESS_CPUTIME_ID of its two processes).
  Other work on the machine barely moves it. It is given as measured and less the floor an
  empty program on the same tracepoint measures per run (the statistics' own clock read, and
  entering a program, which is partly real cost): the truth lies between the two.

Needs root and eBPF; says why and measures nothing otherwise. Alone:
``sudo .venv/bin/python -m benchmarks.bench_collector``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median, quantiles

from benchmarks.common import CliProcess, Result, publisher_rate_per_core
from clover.topics import FLOWS
from collectors.environment import CollectorError, bpf_environment
from tests import samples

PAIRS = 8  # off/on block pairs
ROUNDS = 3  # rounds of each load per block
ROUND_S = 0.5
SETTLE_S = 1.0  # after the collector says it is ready: its start-up work is not measured
DRAIN_S = 1.0  # after the last round: it publishes what the load left in the ring buffer
LOADS = ("bulk", "churn")
# The same programs in this process, detached and attached between rounds of TOGGLE_S seconds:
# TOGGLE_PAIRS neighbouring off/on pairs per load, a fraction of a second apart.
TOGGLE_PAIRS = 40
TOGGLE_S = 0.25

LOADGEN = Path(__file__).with_name("loadgen.c")
STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")


@dataclass
class Round:
    rate: float  # bytes/s (bulk) or connections/s (churn)
    cpu_s: float  # CPU time of the load generator's two processes
    seconds: float


@dataclass
class Block:
    rounds: dict[str, list[Round]] = field(default_factory=lambda: {k: [] for k in LOADS})

    def rate(self, load: str) -> float:
        return median(r.rate for r in self.rounds[load])


def build_loadgen(directory: Path) -> Path:
    out = directory / "loadgen"
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-o", str(out), str(LOADGEN)],
                   check=True, capture_output=True, text=True)
    return out


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """This thread on ``cpu`` while the block runs; processes started meanwhile inherit it."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def load_round(loadgen: Path, load: str, cpu: int | None, seconds: float = ROUND_S) -> Round:
    def pin() -> None:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    out = subprocess.run([str(loadgen), load, str(seconds)], capture_output=True, text=True,
                         check=True, timeout=seconds + 60, preexec_fn=pin)
    rate, cpu_s, seconds = (float(x) for x in out.stdout.split())
    return Round(rate, cpu_s, seconds)


def run_block(loadgen: Path, cpu: int | None, block: Block) -> None:
    for _ in range(ROUNDS):
        for load in LOADS:
            block.rounds[load].append(load_round(loadgen, load, cpu))


@dataclass
class Toggled:
    ratios: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in LOADS})
    on: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in LOADS})
    off: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in LOADS})


def toggled(loadgen: Path, cpu: int | None) -> Toggled:
    """Neighbouring rounds with the collector's BPF programs attached and detached by this
    process (its user space drains and drops the records between rounds)."""
    from collectors.tcp_flows import TcpFlowCollector

    tcp = TcpFlowCollector()
    tcp.start()
    bpf = tcp._bpf
    points = list(bpf.raw_tracepoint_fds)

    def attach(on: bool) -> None:
        for point in points:
            if on and point not in bpf.raw_tracepoint_fds:
                bpf.attach_raw_tracepoint(tp=point, fn_name=b"raw_tracepoint__" + point)
            elif not on and point in bpf.raw_tracepoint_fds:
                bpf.detach_raw_tracepoint(tp=point)

    result = Toggled()
    try:
        for pair in range(TOGGLE_PAIRS):
            for load in LOADS:
                rates = {}
                for on in (False, True) if pair % 2 == 0 else (True, False):
                    attach(on)
                    rates[on] = load_round(loadgen, load, cpu, TOGGLE_S).rate
                    tcp.poll(lambda key, value: None)
                result.ratios[load].append(rates[True] / rates[False])
                result.on[load].append(rates[True])
                result.off[load].append(rates[False])
    finally:
        tcp.close()
    return result


# -- the collector's programs and their in-kernel statistics ----------------------------------

def bpf_programs(pid: int) -> dict[int, tuple[int, int]]:
    """prog_id -> (run_time_ns, run_cnt) of each BPF program process ``pid`` holds (fdinfo)."""
    found = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            if os.readlink(fd) != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in
                        Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().splitlines()
                        if ":" in line)
        except OSError:
            continue  # closed meanwhile
        found[int(info["prog_id"])] = (int(info.get("run_time_ns", 0)),
                                       int(info.get("run_cnt", 0)))
    return found


def program_name(prog_id: int) -> str:
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    try:
        out = subprocess.run([bpftool, "-j", "prog", "show", "id", str(prog_id)],
                             capture_output=True, text=True, timeout=10, check=True)
        return str(json.loads(out.stdout).get("name") or prog_id)
    except (OSError, subprocess.SubprocessError, ValueError):
        return f"prog {prog_id}"


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 while the block runs, then its value before."""
    before = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1")
    try:
        yield
    finally:
        STATS_SYSCTL.write_text(before)


# An empty program on one of the collector's tracepoints, loaded by this process during the
# statistics block. Its run_time_ns per run (where it runs often, so warm: the churn load) is
# what the statistics themselves add to every run (a clock read) plus entering a program; the
# collector's programs are reported both as measured and less that floor per run.
FLOOR_PROGRAM = b"RAW_TRACEPOINT_PROBE(inet_sock_set_state) { return 0; }"


@dataclass
class KernelCost:
    load: str
    rounds: list[Round]
    per_program: dict[int, tuple[int, int]]  # prog_id -> (ns, runs) during the rounds
    floor: tuple[int, int]  # (ns, runs) of FLOOR_PROGRAM during the rounds
    floor_ns: float = 0.0  # run_time_ns per run of an empty program, taken off each run

    @property
    def gross_ns(self) -> int:
        """The collector's programs' run_time_ns, as the kernel reports it."""
        return sum(ns for ns, _ in self.per_program.values())

    @property
    def net_ns(self) -> float:
        """The same, less the empty program's floor for each run."""
        return sum(max(0.0, ns - runs * self.floor_ns) for ns, runs in self.per_program.values())

    @property
    def load_cpu_ns(self) -> float:
        return sum(r.cpu_s for r in self.rounds) * 1e9

    @property
    def units(self) -> float:
        """Connections (churn) or MB (bulk) the rounds moved."""
        total = sum(r.rate * r.seconds for r in self.rounds)
        return total / 1e6 if self.load == "bulk" else total

    @property
    def what(self) -> str:
        return "MB" if self.load == "bulk" else "connection"

    def share(self, ns: float) -> float:
        """``ns`` as a fraction of the load's own CPU time."""
        return ns / self.load_cpu_ns


def _delta(after: dict[int, tuple[int, int]], before: dict[int, tuple[int, int]],
           into: dict[int, tuple[int, int]]) -> None:
    for prog, (ns, runs) in after.items():
        ns0, runs0 = before.get(prog, (0, 0))
        total = into.get(prog, (0, 0))
        into[prog] = (total[0] + ns - ns0, total[1] + runs - runs0)


def kernel_cost(loadgen: Path, cpu: int | None, pid: int, load: str) -> KernelCost:
    rounds: list[Round] = []
    deltas: dict[int, tuple[int, int]] = {}
    floor: dict[int, tuple[int, int]] = {}
    for _ in range(ROUNDS):
        before, floor_before = bpf_programs(pid), bpf_programs(os.getpid())
        rounds.append(load_round(loadgen, load, cpu))
        _delta(bpf_programs(pid), before, deltas)
        _delta(bpf_programs(os.getpid()), floor_before, floor)
    return KernelCost(load, rounds, deltas, (sum(ns for ns, _ in floor.values()),
                                             sum(runs for _, runs in floor.values())))


def with_floor(costs: list[KernelCost]) -> list[KernelCost]:
    """The costs, each with the floor of the load where the empty program ran most."""
    ns, runs = max((c.floor for c in costs), key=lambda f: f[1], default=(0, 0))
    for cost in costs:
        cost.floor_ns = ns / runs if runs else 0.0
    return costs


# -- the benchmark ------------------------------------------------------------------------------

def cpus() -> tuple[int | None, int | None]:
    """(the load's CPU, the collector's CPU), or no pinning on a single-CPU machine."""
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[-1]) if len(allowed) >= 2 else (None, None)


def _spread(ratios: list[float]) -> str:
    """Median (range), or median (quartiles; range) of many."""
    if len(ratios) < 12:
        return f"{median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
    low, mid, high = quantiles(ratios, n=4)
    return f"{mid:.3f} (quartiles {low:.3f}-{high:.3f}; {min(ratios):.3f}-{max(ratios):.3f})"


def run() -> list[Result]:
    try:
        bpf_environment()
    except CollectorError as exc:
        print(f"collector benchmarks skipped: {exc}", file=sys.stderr)
        return []
    load_cpu, collector_cpu = cpus()
    with tempfile.TemporaryDirectory(prefix="clover-bench-") as tmp, pinned(collector_cpu):
        loadgen = build_loadgen(Path(tmp))
        off: list[Block] = []
        on: list[Block] = []
        cpu = 0.0
        published = 0
        costs: list[KernelCost] = []
        names: dict[int, str] = {}
        for pair in range(PAIRS + 1):
            last = pair == PAIRS  # the in-kernel statistics block, collector on
            if pair % 2 == 0 and not last:
                off.append(Block())
                run_block(loadgen, load_cpu, off[-1])
            # The collector in its own process, on its own CPU (inherited from this thread):
            # its CPU time is measured while it runs.
            collector = CliProcess(["collect", "flows"], {"CLOVER_COLLECTORS_METRICS_PORT": "0"},
                                   ready="collecting flows")
            try:
                time.sleep(SETTLE_S)
                cpu_before = collector.cpu_seconds()
                if last:
                    from bcc import BPF

                    floor = BPF(text=FLOOR_PROGRAM)
                    try:
                        with bpf_stats():
                            costs = with_floor([
                                kernel_cost(loadgen, load_cpu, collector.proc.pid, load)
                                for load in LOADS])
                    finally:
                        floor.cleanup()
                    names = {prog: program_name(prog) for prog in costs[0].per_program}
                else:
                    on.append(Block())
                    run_block(loadgen, load_cpu, on[-1])
                time.sleep(DRAIN_S)
                cpu += collector.cpu_seconds() - cpu_before
            finally:
                out = collector.stop()
                if not out.startswith("published "):
                    raise RuntimeError(f"the collector exited with {collector.proc.returncode}: "
                                       f"{out!r}")
                published += int(out.split()[1])  # "published N flow records; ..."
            if pair % 2 == 1 and not last:
                off.append(Block())
                run_block(loadgen, load_cpu, off[-1])
        flips = toggled(loadgen, load_cpu)

    ratios = {load: [a.rate(load) / b.rate(load) for a, b in zip(on, off, strict=True)]
              for load in LOADS}
    pinning = (f"load on CPU {load_cpu}, collector on CPU {collector_cpu}"
               if load_cpu is not None else "one CPU: nothing pinned")
    print(f"\ncollector overhead ({pinning}; {PAIRS} off/on block pairs of {ROUNDS} x "
          f"{ROUND_S} s rounds per load, alternating order)")
    for load in LOADS:
        unit, scale = ("MB/s", 1e6) if load == "bulk" else ("conn/s", 1.0)
        print(f"  {load:5}  on/off per pair: "
              + " ".join(f"{r:.3f}" for r in ratios[load])
              + f"  -> median {_spread(ratios[load])}")
        print(f"         off blocks {', '.join(f'{b.rate(load) / scale:,.0f}' for b in off)} "
              f"{unit}")
        print(f"         on blocks  {', '.join(f'{b.rate(load) / scale:,.0f}' for b in on)} "
              f"{unit}")
    for cost in costs:
        what = cost.what
        print(f"  in-kernel, {cost.load} (bpf_stats, {len(cost.rounds)} x {ROUND_S} s): "
              f"{cost.net_ns / cost.units:,.0f} ns per {what} = "
              f"{cost.share(cost.net_ns):.2%} of the load's own CPU time "
              f"({cost.load_cpu_ns / cost.units:,.0f} ns per {what}), less an empty program's "
              f"{cost.floor_ns:.0f} ns per run; as run_time_ns reports it "
              f"{cost.gross_ns / cost.units:,.0f} ns = {cost.share(cost.gross_ns):.2%}")
        for prog, (ns, runs) in sorted(cost.per_program.items(), key=lambda p: -p[1][0]):
            if runs:
                print(f"    {names.get(prog, prog)!s:<36} {runs / cost.units:7.2f} runs per "
                      f"{what}, {ns / runs:6.0f} ns per run")
    print(f"  the same programs attached and detached by this process between neighbouring "
          f"rounds ({TOGGLE_PAIRS} pairs of {TOGGLE_S} s rounds per load):")
    for load in LOADS:
        print(f"  {load:5}  on/off median {_spread(flips.ratios[load])}")
    results = [
        Result("collector: flow records into Kafka per core", published / cpu,
               publisher_rate_per_core(FLOWS, samples.sample_flow()),
               "the same publisher producing ready-made records"),
    ]
    # The ratio column is the median of the paired on/off ratios (each pair ran a moment
    # apart), which the medians of all on and all off rounds need not give.
    for load, name, unit, scale in (("bulk", "loopback TCP bulk throughput", "MB/s", 1e6),
                                    ("churn", "loopback TCP connections/s", "/s", 1.0)):
        results.append(Result(
            f"{name}, collector on, % of off", 100 * median(ratios[load]), 100.0,
            f"paired median (range) {_spread(ratios[load])}; medians "
            f"{median(b.rate(load) for b in on) / scale:,.0f} vs "
            f"{median(b.rate(load) for b in off) / scale:,.0f} {unit}", unit="%"))
    for load, name, unit, scale in (("bulk", "loopback TCP bulk throughput", "MB/s", 1e6),
                                    ("churn", "loopback TCP connections/s", "/s", 1.0)):
        results.append(Result(
            f"{name}, BPF attached, % of detached", 100 * median(flips.ratios[load]), 100.0,
            f"{TOGGLE_PAIRS} paired rounds: median {_spread(flips.ratios[load])}; medians "
            f"{median(flips.on[load]) / scale:,.0f} vs {median(flips.off[load]) / scale:,.0f} "
            f"{unit}", unit="%"))
    for cost in costs:
        results.append(Result(
            f"collector in-kernel time per {cost.what}", cost.net_ns / cost.units,
            cost.load_cpu_ns / cost.units,
            f"the load's CPU time per {cost.what}: ratio = the share; "
            f"{cost.share(cost.gross_ns):.3f} with the timing floor", unit="ns"))
    return results


if __name__ == "__main__":
    for r in run():
        print(f"{r.name}: {r.rate:,.1f} {r.unit} vs {r.baseline_rate:,.1f} {r.unit} "
              f"= {r.rate / r.baseline_rate:.3f} ({r.baseline})")
