"""Ray job entrypoint: the nightly incremental pipeline (fine-tune if the data changed, promote
only a better model, embed only new or changed shards).

    ray job submit --working-dir . -- python jobs/nightly.py --config jobs/configs/nightly_demo.yaml

Same as `sbertray nightly CONFIG [overrides]`; connects to the cluster in $RAY_ADDRESS.
"""

import sys

from sbertray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("nightly"))
