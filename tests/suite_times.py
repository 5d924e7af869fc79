"""Print the wall time of each test module, and of the fault suite, from pytest's JUnit XML.

``make test`` runs it after pytest: the fault suite (every F and B case, the commit,
identity and untrusted-file contracts, and the F4 multi-node module) has a time budget of
its own, read here from the same run rather than timed again.

    python tests/suite_times.py .cache/junit.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

#: The modules of the fault suite.
FAULT_SUITE = (
    "test_faults", "test_storage_faults", "test_commit", "test_slide_errors",
    "test_untrusted", "test_ids", "test_multinode",
)  # fmt: skip


def module_times(path: str) -> dict[str, tuple[int, float]]:
    """Per test module: (tests, seconds), setup and teardown included."""
    out: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1] or "?"
        out[module][0] += 1
        out[module][1] += float(case.get("time", 0.0))
    return {m: (int(n), t) for m, (n, t) in out.items()}


def main(argv: list[str]) -> int:
    times = module_times(argv[0])
    for module, (n, t) in sorted(times.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"{module:32s} {n:4d} tests {t:8.1f} s")
    suite = [times[m] for m in FAULT_SUITE if m in times]
    n, t = sum(x[0] for x in suite), sum(x[1] for x in suite)
    print(f"fault suite ({', '.join(FAULT_SUITE)}): {n} tests in {t:.1f} s ({t / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
