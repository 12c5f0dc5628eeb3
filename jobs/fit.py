"""`ray job submit` entrypoint: spade-batch fit (the same flags as `spade-batch fit --help`).

    ray job submit --working-dir . -- python jobs/fit.py --train s3://factory/line3/normal/ --model s3://factory/models/line3 --gpus-per-task 1
"""

import sys

from spade_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
