"""Ray job entrypoint for the HTTP API: `ray job submit --working-dir . -- python jobs/serve.py -c CONFIG`."""

import sys

from vlsae_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
