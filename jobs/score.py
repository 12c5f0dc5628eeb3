"""`ray job submit` entrypoint: spade-batch score (the same flags as `spade-batch score --help`).

    ray job submit --working-dir . -- python jobs/score.py --model s3://f/models/line3 --images s3://f/line3/2026-11-29/ --out s3://f/results/2026-11-29
"""

import sys

from spade_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
