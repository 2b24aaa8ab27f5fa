# The GPU image: the worker (`celery -A worker worker`) and the trainer (`python -m trainer train`).
# Build it from the repository root: docker compose builds it for the worker and trainer services.
#
# torch's wheels bring their own CUDA libraries, so the small `base` flavour of the CUDA image is enough: it
# carries the settings the NVIDIA container toolkit reads, and refuses to start on a driver too old for its
# CUDA version. PyPI's torch 2.13 is built for CUDA 13; for an older driver, pick a CUDA 12 image here and
# the matching PyTorch index in TORCH_INDEX_URL.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${CUDA_IMAGE}

# The same torch as scripts/setup-venv.sh installs.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
# The user the services run as; the trainer writes adapters into the host's ./loradir with this uid.
ARG APP_UID=1000

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install --yes --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and pinned, in a layer of its own: several GB that only a new version rebuilds.
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# The dependencies from pyproject.toml alone: a change to the code keeps this layer.
COPY pyproject.toml docker/project_requirements.py /tmp/build/
RUN python /tmp/build/project_requirements.py /tmp/build/pyproject.toml worker > /tmp/build/requirements.txt \
    && pip install --requirement /tmp/build/requirements.txt \
    && rm -rf /tmp/build

# The code: the shared contract, the worker and the trainer (not the bot).
COPY pyproject.toml README.md /tmp/src/
COPY imagine/ /tmp/src/imagine/
COPY worker/ /tmp/src/worker/
COPY trainer/ /tmp/src/trainer/
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

# ubuntu:24.04 comes with a user `ubuntu` of uid 1000, the default APP_UID.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid "${APP_UID}" imagine \
    && mkdir -p /app/loradir /cache \
    && chown imagine /app /app/loradir /cache
# A named volume mounted on /cache starts as a copy of this folder, so it belongs to imagine too.
USER imagine
WORKDIR /app
