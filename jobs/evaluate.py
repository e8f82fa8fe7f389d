"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/evaluate.py -c CONFIG`."""

import sys

from vlsae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
