"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/steer.py -c CONFIG`."""

import sys

from vlsae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["steer", *sys.argv[1:]]))
