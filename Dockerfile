# Container image for the `agcnn` command (inference, training, evaluation).
#
#   docker build -t agcnn .
#   docker run --rm --network none --read-only --tmpfs /tmp \
#       -v /data/xrays:/input:ro -v "$PWD/out":/output -v "$PWD/models":/models:ro \
#       agcnn predict --checkpoint /models/model.pt --input /input --output /output
#
#   docker run -d -p 11112:11112 --read-only --tmpfs /tmp -v "$PWD/models":/models:ro -v /srv/node:/output \
#       agcnn serve --checkpoint /models/model.pt --output /output --ae-title AGCNN --port 11112 \
#       --forward PACS@pacs.example.org:104
#
# See the README's Deploy section. The image runs as the unprivileged user 10001, needs no network at run
# time (except `send` and `serve`, which talk DICOM) and writes only to /output and /tmp (mount a tmpfs
# there when the root is read-only).
#
# BASE may be any Debian bookworm image: the official Python image (default) or a bare Debian
# root file system; Python 3.11 is installed from Debian when the base has none. Either way the
# package lives in a virtual environment at /opt/venv.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# Optional package sources for offline or mirrored builds (unset: pip uses PyPI).
# A CA bundle for a TLS-intercepting proxy can be passed as the build secret `pipca`.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Every RUN starts with `set -eu` (a SHELL instruction is dropped by OCI-format builds).

# Python (only when the base has none), the virtual environment and the unprivileged user.
# DL3008: the Debian packages are not pinned; they follow the base release and its security
# updates (a pinned version disappears from the mirror after the next point release).
# hadolint ignore=DL3008
RUN set -eu; \
    if ! command -v python3 >/dev/null 2>&1; then \
        export DEBIAN_FRONTEND=noninteractive; \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv; \
    groupadd --gid 10001 agcnn; \
    useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin agcnn; \
    mkdir -p /input /output /models; \
    chown 10001:10001 /output

# Dependencies first, from pyproject.toml alone, so that a code change does not reinstall
# torch. The version is dynamic (read from the package), so the dependency list is extracted
# here instead of installing the project itself.
COPY pyproject.toml /opt/agcnn-src/pyproject.toml
RUN --mount=type=secret,id=pipca \
    set -eu; \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    python -c 'import tomllib; d = tomllib.load(open("/opt/agcnn-src/pyproject.toml", "rb")); print("\n".join(d["build-system"]["requires"] + d["project"]["dependencies"]))' \
        > /opt/agcnn-src/requirements.txt; \
    cat /opt/agcnn-src/requirements.txt; \
    pip install --no-cache-dir -r /opt/agcnn-src/requirements.txt; \
    pip check

# The package itself: no dependency resolution and no network needed from here on.
COPY . /opt/agcnn-src/
RUN set -eu; \
    pip install --no-cache-dir --no-deps --no-build-isolation /opt/agcnn-src; \
    rm -rf /opt/agcnn-src/build /opt/agcnn-src/*.egg-info; \
    agcnn --version

# Everything that wants a writable home or cache goes to /tmp (a tmpfs with --read-only).
ENV HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    TORCH_HOME=/tmp/.cache/torch \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

USER 10001:10001
WORKDIR /output
VOLUME ["/input", "/output", "/models"]
# `agcnn serve`'s default DICOM port (unprivileged: the container does not run as root).
EXPOSE 11112
ENTRYPOINT ["agcnn"]
CMD ["--help"]
