"""The Ray Serve application of vlsae-ray (HTTP API over the library)."""
