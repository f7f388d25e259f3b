# syntax=docker/dockerfile:1
# creditgate: the gateway, the sync worker and the CLI in one image.
#
#   docker build -t creditgate .
#   docker run -p 8080:8080 -v $PWD/creditgate.yaml:/etc/creditgate/creditgate.yaml:ro creditgate
#
# The default command serves the reverse proxy on 0.0.0.0:8080 with the config at
# /etc/creditgate/creditgate.yaml (mount yours there); any other creditgate command can be
# given instead (`sync`, `migrate`, `orgs set-plan ...`). See docker-compose.yml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: wheels for creditgate and its dependencies (no dev deps) ----------------------
# gcc compiles the optional C scan of usage answers (gateway/usage/_topscan.c) and the sync
# job's decode (sync/_entries.c; hatch_build.py) into creditgate's wheel; the runtime stage
# gets the wheel only, no compiler. Without gcc the build still succeeds and the image runs
# the pure-Python forms (a little more CPU per usage-charged answer and per synced event:
# BENCHMARKS.md, "A compiled top-level scan" and 11g).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md hatch_build.py ./
COPY gateway ./gateway
COPY sync ./sync
COPY lua ./lua
COPY migrations ./migrations
RUN pip wheel --wheel-dir /wheels .

# -- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CREDITGATE_CONFIG=/etc/creditgate/creditgate.yaml
RUN groupadd --system --gid 10001 creditgate \
    && useradd --system --uid 10001 --gid creditgate --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin creditgate
# Only the wheels built above (--no-index): the versions are those of the build stage.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels creditgate
COPY --chown=root:root --chmod=0644 examples/creditgate.yaml /etc/creditgate/creditgate.yaml
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
# No curl in the slim image: the check is Python's urllib (liveness of the default port).
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["creditgate"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--config", "/etc/creditgate/creditgate.yaml"]
