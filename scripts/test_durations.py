"""Writes tests/durations.json, the order `conftest.py` hands tests out in (longest first),
from the output of a whole run with per-test durations:

    bash scripts/test.sh --durations=0 | tee run.log
    .venv/bin/python scripts/test_durations.py run.log
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "tests" / "durations.json"
LINE = re.compile(r"^([0-9.]+)s (?:setup|call|teardown)\s+(\S+)$")


def main(log: str) -> None:
    seconds: dict[str, float] = defaultdict(float)
    for line in Path(log).read_text().splitlines():
        if match := LINE.match(line.strip()):
            seconds[match.group(2)] += float(match.group(1))
    # Tests under a second are left out: their order changes nothing.
    kept = {test: round(s, 1) for test, s in sorted(seconds.items()) if s >= 1.0}
    TARGET.write_text(json.dumps(kept, indent=0) + "\n")
    print(f"{TARGET}: {len(kept)} tests")


if __name__ == "__main__":
    main(sys.argv[1])
