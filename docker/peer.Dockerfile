# murmur peer: trains on one NVIDIA GPU. Build from the repository root:
#   docker build -f docker/peer.Dockerfile -t murmur-peer .
# Run (needs the NVIDIA container toolkit):
#   docker run --gpus all -v murmur-peer:/data murmur-peer --swarm NAME --initial-peers MADDR --run-key KEY
# Identity, pinned run key and checkpoints live in /data (MURMUR_HOME). Without a published port the peer is
# client-only; with one: -p 7000:7000 ... --listen 0.0.0.0:7000 --announce PUBLIC_IP:7000
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MURMUR_HOME=/data

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 murmur \
 && mkdir -p /data && chown murmur:murmur /data

WORKDIR /app

# Dependencies first: torch (a CUDA build), then the rest of pyproject.toml's dependencies.
# PyPI's Linux x86_64 torch wheel is its CUDA build and brings its CUDA libraries as pip packages, so only
# the host's NVIDIA driver is needed; download.pytorch.org's cu128 index publishes no 2.13.0.
RUN pip install torch==2.13.0
COPY pyproject.toml ./
RUN mkdir peer protocol bootstrap \
 && touch README.md peer/__init__.py protocol/__init__.py bootstrap/__init__.py \
 && pip install . \
 && pip uninstall -y murmur \
 && rm -rf peer protocol bootstrap README.md build *.egg-info

COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info

USER murmur
# /data: identity, pins, checkpoints. 7000: the PeerService (open it, or run with --client-only).
VOLUME ["/data"]
EXPOSE 7000/tcp

ENTRYPOINT ["murmur", "run"]
CMD ["--help"]
