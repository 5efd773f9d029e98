# murmur peer: trains on one NVIDIA GPU. Build from the repository root:
#   docker build -f docker/peer.Dockerfile -t murmur-peer .
# Run (needs the NVIDIA container toolkit):
#   docker run --gpus all --stop-timeout 300 -v murmur-peer:/data murmur-peer \
#     --swarm NAME --initial-peers MADDR --run-key KEY
# Identity, pinned run key and checkpoints live in /data (MURMUR_HOME). Without a published port the peer is
# client-only; with one: -p 7000:7000 ... --listen 0.0.0.0:7000 --announce PUBLIC_IP:7000
# Stop with time to save: `docker stop -t 300 CONTAINER` (or --stop-timeout at `docker run`, stop_grace_period in
# compose). On SIGTERM the peer finishes its step and writes a checkpoint; for a 1.3b model that is gigabytes, and
# docker's default of 10 s would SIGKILL it half-way (the previous checkpoint is kept, the rounds since are lost).
# Offline (no registry, no index; tests/test_docker_build.py via peer/lab/docker_offline.py): a local base image with
# python3 and python3-venv, and a wheelhouse served on loopback, which the build reaches through the host network:
#   docker build --network host --build-arg BASE=murmur-base:bookworm --build-arg WHEELS=http://127.0.0.1:PORT/ \
#     -f docker/peer.Dockerfile -t murmur-peer .
# GPUs: torch 2.13.0 from PyPI is the CUDA 13.0 build (PyPI's torch moved from CUDA 12.8 to 13.0 with 2.11; the
# 2.14.1 wheel's METADATA pins cuda-toolkit 13.0.3 and nvidia-cudnn-cu13), compiled for sm_75 sm_80 sm_86 sm_90
# sm_100 sm_120 (+PTX, PyTorch's CUDA 13.0 list): Turing (RTX 20xx, T4), Ampere (RTX 30xx, A100), Ada (RTX 40xx), Hopper
# (H100/H200), Blackwell (B200, RTX 50xx). Not Pascal (GTX 10xx) or Volta (V100): CUDA 13 dropped them. The host needs
# an NVIDIA driver >= 580. The build prints torch's real list and keeps it in /opt/venv/gpu-archs.txt.
# The base only brings what the NVIDIA container toolkit reads (NVIDIA_REQUIRE_CUDA: it refuses a driver too old for
# CUDA 13.0 at `docker run`, before torch fails obscurely): torch's wheel brings its own CUDA libraries as pip packages.
ARG BASE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE}
LABEL org.opencontainers.image.title="murmur peer" \
      murmur.cuda="13.0" \
      murmur.gpu-archs="sm_75 sm_80 sm_86 sm_90 sm_100 sm_120+PTX" \
      murmur.min-driver="580"

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MURMUR_HOME=/data \
    MURMUR_RUN_ADDRS_FILE=/data/addrs.txt

# What the image runs, declared before the big layers: the legacy builder commits a container for every instruction,
# and a storage driver that copies (vfs) copies the whole file system for each one that comes after torch.
# 7000: the PeerService (open it, or run --client-only).
EXPOSE 7000/tcp
STOPSIGNAL SIGTERM
# Healthy when this peer's own DHT node answers a DHT ping (peer/cli/health.py) at the address the peer wrote to
# $MURMUR_RUN_ADDRS_FILE. Its own, not the bootstrap nodes': the check says whether this container's process is
# alive, and restarting a peer because a bootstrap node is away would only cost it its rounds since the checkpoint.
HEALTHCHECK --interval=60s --timeout=30s --start-period=180s --retries=3 \
  CMD ["murmur", "health", "--addrs-file", "/data/addrs.txt"]
ENTRYPOINT ["murmur", "run"]
CMD ["--help"]

WORKDIR /app
# Python from apt only where the base has none that makes virtual environments (the CUDA base), so that a base
# which brings it (the offline one) needs no package index.
RUN if ! python3 -m venv --help >/dev/null 2>&1; then \
      apt-get update \
      && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 murmur \
 && mkdir -p /data && chown murmur:murmur /data
# /data: identity, pins, checkpoints, the DHT's addrs file.
VOLUME ["/data"]

# Dependencies first, so code changes do not reinstall them: torch, then the rest of pyproject.toml's dependencies,
# resolved from pyproject itself (empty package stubs). The build args are declared here, at the first RUN that uses
# them, so that another value misses the cache only from here on. TORCH_INDEX: where torch comes from (PyPI: its
# Linux x86_64 wheel is the CUDA 13.0 build, whose CUDA libraries arrive as pip packages, so only the host's NVIDIA
# driver is needed; download.pytorch.org's cu128 index publishes no 2.13.0). WHEELS, when set: the one place pip takes
# every wheel from (--no-index --find-links), a URL or a path inside the build; the wheelhouse then never enters the
# build context or a layer. Then the GPU architectures this torch was compiled for, printed and kept (an offline build's
# CPU torch says so).
ARG TORCH_INDEX=https://pypi.org/simple
ARG WHEELS=""
RUN pip install ${WHEELS:+--no-index --find-links "$WHEELS"} torch==2.13.0 --index-url "$TORCH_INDEX" \
 && python -c "import torch; flags = getattr(torch._C, '_cuda_getArchFlags', lambda: '')() or 'none (a CPU build)'; \
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, GPU architectures: {flags}')" \
    > /opt/venv/gpu-archs.txt \
 && cat /opt/venv/gpu-archs.txt
COPY pyproject.toml ./
RUN mkdir peer protocol bootstrap \
 && touch README.md peer/__init__.py protocol/__init__.py bootstrap/__init__.py \
 && pip install ${WHEELS:+--no-index --find-links "$WHEELS"} . \
 && pip uninstall -y murmur \
 && rm -rf peer protocol bootstrap README.md build *.egg-info

COPY . .
RUN pip install ${WHEELS:+--no-index --find-links "$WHEELS"} --no-deps . && rm -rf build *.egg-info
USER murmur
