"""Ray job entrypoint: embed Parquet shards and write embeddings + similarity scores.

    ray job submit --working-dir . -- \
        python jobs/embed.py --config jobs/configs/embed_demo.yaml output.path=s3://bucket/out

Same as `sbertray embed CONFIG [overrides]`; connects to the cluster in $RAY_ADDRESS.
"""

import sys

from sbertray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("embed"))
