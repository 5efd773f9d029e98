# murmur bootstrap node: a long-lived DHT node that peers find their swarm through. CPU only.
# Build from the repository root:  docker build -f docker/bootstrap.Dockerfile -t murmur-bootstrap .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MURMUR_LOG_LEVEL=INFO

RUN useradd --create-home --uid 10001 murmur \
 && mkdir -p /data /addrs \
 && chown murmur:murmur /data /addrs

WORKDIR /app

# Dependencies first, so code changes do not reinstall them. hivemind imports torch, so the bootstrap
# image needs torch too: the CPU wheel (about 200 MB instead of several GB of CUDA libraries).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# The rest of pyproject.toml's dependencies, resolved from pyproject itself (empty package stubs).
COPY pyproject.toml ./
RUN mkdir peer protocol bootstrap \
 && touch README.md peer/__init__.py protocol/__init__.py bootstrap/__init__.py \
 && pip install . \
 && pip uninstall -y murmur \
 && rm -rf peer protocol bootstrap README.md build *.egg-info

COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info

USER murmur
# /data holds the libp2p identity (stable peer id across restarts) and the addrs file.
VOLUME ["/data"]
EXPOSE 31337/tcp

# Healthy when the node has written its multiaddrs and its port accepts TCP (port read from the file).
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
  CMD ["python", "-c", "import socket; a = open('/data/addrs.txt').readline().split('/'); socket.create_connection(('127.0.0.1', int(a[4])), 3).close()"]

ENTRYPOINT ["murmur", "bootstrap"]
CMD ["--host-maddrs", "/ip4/0.0.0.0/tcp/31337", "--identity", "/data/identity.key", "--addrs-file", "/data/addrs.txt"]
