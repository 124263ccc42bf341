#!/usr/bin/env bash
# The test command (README and CI): set up, then run the whole suite on a 2-CPU local Ray with
# a real S3 server (SeaweedFS) that the fixtures start and stop. Extra args go to pytest
# (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Keep local Ray on 127.0.0.1 (read when ray is imported).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
unset RAY_ADDRESS
# Two workers' torch threads share 2 cores. libgomp's threads spin for a long while waiting for
# work, on a core the other worker needs: two MiniLM encodes at once took 28 s each here, 7.5 s
# with a short spin (one alone: 3.8 s, 4.7 s).
export GOMP_SPINCOUNT="${GOMP_SPINCOUNT:-1000}"
set +e
# Two pytest workers, each with its own Ray and S3 server: run alone, the suite leaves a third
# of this 2-core machine idle (process start-ups, Ray's waits), which the other worker fills.
# One test handed out at a time, the `long` ones first (conftest.py), so both end together.
.venv/bin/python -m pytest -n 2 --dist load --maxschedchunk 1 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
