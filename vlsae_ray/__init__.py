"""vlsae-ray: sparse autoencoders for vision-language models on Ray."""

import os

from vlsae_ray._torchvision import ensure_torchvision

# Nothing we run reports usage or reaches a hub; every process that imports us (Ray workers too).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ensure_torchvision()

__version__ = "0.1.0"
