"""`ray job submit` entrypoint: spade-batch fit (the same flags as `spade-batch fit --help`).

    ray job submit --working-dir . -- python jobs/fit.py --config jobs/nightly.yaml ...
"""

import sys

from spade_batch.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit", *sys.argv[1:]]))
