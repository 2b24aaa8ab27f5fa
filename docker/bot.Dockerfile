# The slim image, without torch: the Discord bot (`python -m bot`), the web page (`python -m web`) and Flower
# (`celery -A worker flower`).
# Build it from the repository root: docker compose builds it for the bot and flower services.
FROM python:3.12-slim

# The user the services run as (the same uid as the GPU image's).
ARG APP_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The dependencies from pyproject.toml alone (the shared ones, the bot's, the web page's and Flower's; never
# the worker's):
# a change to the code keeps this layer.
COPY pyproject.toml docker/project_requirements.py /tmp/build/
RUN python /tmp/build/project_requirements.py /tmp/build/pyproject.toml bot web monitor > /tmp/build/requirements.txt \
    && pip install --requirement /tmp/build/requirements.txt \
    && rm -rf /tmp/build

# The code: the shared contract, the bot and the web page, and the worker package for Flower, which loads the worker's
# Celery app; importing that app loads no torch (the model code is imported only when a worker starts).
COPY pyproject.toml README.md /tmp/src/
COPY imagine/ /tmp/src/imagine/
COPY bot/ /tmp/src/bot/
COPY web/ /tmp/src/web/
COPY worker/ /tmp/src/worker/
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src

RUN useradd --create-home --uid "${APP_UID}" imagine
USER imagine
WORKDIR /home/imagine
