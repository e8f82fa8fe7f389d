"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/label.py -c CONFIG`."""

import sys

from vlsae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
