"""Subprocess entry of a CPU measurement: one case per process, so its peak RSS is its own.

Reads ``{"case": {...}, "mem_cap_bytes": int|null}`` as JSON on stdin and prints the record on one
line that starts with :data:`benchmarks.measure.RECORD_PREFIX`.
"""
import json
import sys

from .measure import RECORD_PREFIX, Case, measure_cpu


def main() -> int:
    payload = json.loads(sys.stdin.read())
    rec = measure_cpu(Case(**payload["case"]), payload.get("mem_cap_bytes"))
    sys.stdout.write("\n" + RECORD_PREFIX + json.dumps(rec) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
