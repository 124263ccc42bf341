"""Ray job entrypoint: fine-tune from a recipe.

    ray job submit --working-dir . -- \
        python jobs/finetune.py --config jobs/configs/stsb.yaml training.epochs=1

Same as `sbertray train CONFIG [overrides]`; connects to the cluster in $RAY_ADDRESS.
"""

import sys

from sbertray.cli import job_main

if __name__ == "__main__":
    sys.exit(job_main("train"))
