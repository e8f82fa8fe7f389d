"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/train.py -c CONFIG`."""

import sys

from vlsae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
