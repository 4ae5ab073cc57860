"""`make bench`: run every benchmark and print one line each, with its ratio to the baseline."""

from __future__ import annotations

import sys

from benchmarks import (
    bench_aggregate,
    bench_collector,
    bench_kafka,
    bench_receivers,
    bench_records,
    bench_rollback,
)


def main() -> int:
    results = [*bench_records.run(), *bench_kafka.run(), *bench_receivers.run(),
               *bench_collector.run(), *bench_aggregate.run(), *bench_rollback.run()]
    width = max(len(r.name) for r in results)
    print(f"{'benchmark':<{width}}  {'rate':>14}  {'baseline':>14}  ratio  (baseline)")
    for r in results:
        print(f"{r.name:<{width}}  {r.rate:>10,.0f} {r.unit:<4} {r.baseline_rate:>10,.0f} "
              f"{r.unit:<4} {r.rate / r.baseline_rate:5.2f}  ({r.baseline})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
