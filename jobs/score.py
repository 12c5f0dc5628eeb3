"""`ray job submit` entrypoint: spade-batch score (the same flags as `spade-batch score --help`).

    ray job submit --working-dir . -- python jobs/score.py --config jobs/nightly.yaml ...
"""

import sys

from spade_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
