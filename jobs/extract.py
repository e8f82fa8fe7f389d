"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/extract.py -c CONFIG`."""

import sys

from vlsae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["extract", *sys.argv[1:]]))
