"""`ray job submit` entrypoint: spade-batch nightly (the same flags as `spade-batch nightly --help`).

    ray job submit --working-dir . -- python jobs/nightly.py --config jobs/nightly.yaml ...
    ray job submit --working-dir . -- python jobs/nightly.py --plan lines.yaml --out 's3://bucket/plan/{date}'
"""

import sys

from spade_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
