# murmur bootstrap node: a long-lived DHT node that peers find their swarm through. CPU only.
# Build from the repository root:  docker build -f docker/bootstrap.Dockerfile -t murmur-bootstrap .
# Offline (no registry, no index; tests/test_docker_build.py via peer/lab/docker_offline.py): a local base image with
# python3 and python3-venv, and a wheelhouse served on loopback, which the build reaches through the host network:
#   docker build --network host --build-arg BASE=murmur-base:bookworm --build-arg WHEELS=http://127.0.0.1:PORT/ \
#     -f docker/bootstrap.Dockerfile -t murmur-bootstrap .
# Stop: `docker stop murmur-bootstrap` (SIGTERM; the node shuts its DHT down in a few seconds, well within docker's
# default 10 s; compose gives it 30 s).
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MURMUR_LOG_LEVEL=INFO \
    MURMUR_HOME=/data \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# What the image runs, declared before the big layers: the legacy builder commits a container for every instruction,
# and a storage driver that copies (vfs) copies the whole file system for each one that comes after torch.
EXPOSE 31337/tcp
STOPSIGNAL SIGTERM
# Healthy when the node answers a DHT ping from a client-mode DHT node started for the check (peer/cli/health.py),
# at the address it wrote in its addrs file: the DHT itself serves, not only its port. About 2 CPU-seconds a check.
HEALTHCHECK --interval=60s --timeout=30s --start-period=90s --retries=3 \
  CMD ["murmur", "health", "--addrs-file", "/data/addrs.txt"]
ENTRYPOINT ["murmur", "bootstrap"]
CMD ["--host-maddrs", "/ip4/0.0.0.0/tcp/31337", "--identity", "/data/identity.key", "--addrs-file", "/data/addrs.txt"]

WORKDIR /app
RUN python3 -m venv /opt/venv \
 && useradd --create-home --uid 10001 murmur \
 && mkdir -p /data /addrs \
 && chown murmur:murmur /data /addrs
# /data holds the libp2p identity (stable peer id across restarts) and the addrs file.
VOLUME ["/data"]

# Dependencies first, so code changes do not reinstall them, into a virtual environment, so that the same lines work
# on python:3.11-slim and on a Debian base whose system Python refuses pip (PEP 668). hivemind imports torch, so the
# bootstrap image needs torch too: the CPU wheel (about 200 MB instead of several GB of CUDA libraries). The build
# args are declared here, at the first RUN that uses them, so that another value misses the cache only from here on.
# TORCH_INDEX: where the CPU torch wheel comes from. WHEELS, when set: the one place pip takes every wheel from
# (--no-index --find-links), a URL or a path inside the build; the wheelhouse then never enters the build context
# or a layer.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG WHEELS=""
RUN pip install ${WHEELS:+--no-index --find-links "$WHEELS"} torch==2.13.0 --index-url "$TORCH_INDEX"
# The rest of pyproject.toml's dependencies, resolved from pyproject itself (empty package stubs).
COPY pyproject.toml ./
RUN mkdir peer protocol bootstrap \
 && touch README.md peer/__init__.py protocol/__init__.py bootstrap/__init__.py \
 && pip install ${WHEELS:+--no-index --find-links "$WHEELS"} . \
 && pip uninstall -y murmur \
 && rm -rf peer protocol bootstrap README.md build *.egg-info

COPY . .
RUN pip install ${WHEELS:+--no-index --find-links "$WHEELS"} --no-deps . && rm -rf build *.egg-info
USER murmur
