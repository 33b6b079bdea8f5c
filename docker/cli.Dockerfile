# CLI / scheduler image: `panoptic-batch submit|status|stats|cancel|retry|reap|…` and Flower.
#
#   docker build -f docker/cli.Dockerfile -t panoptic-batch-cli .           (from the repository root)
#   docker run --rm -e PANOPTIC_BROKER_URL=… -e PANOPTIC_DATABASE_URL=… -e AWS_…=… \
#       panoptic-batch-cli submit s3://photos/incoming --dest s3://photos/panoptic
#
# Small on purpose: torch and torchvision are the CPU builds from PyTorch's CPU wheel index
# (no CUDA libraries), at the versions the repository's constraints.txt pins, and the project is
# installed under the same constraints so pip cannot swap in PyPI's CUDA torch. `submit` loads no
# model; `predict` and `run` work here too, on the CPU.
#
# Pinned to the Python minor version and the Debian release; pin a digest (python:…@sha256:…)
# for bit-for-bit reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Flower (the Celery monitoring UI of docker-compose.yml's `flower` service) rides along: it is
# small, and running it from this image means it uses the project's Celery app and broker settings.
ARG FLOWER_VERSION=2.2.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /opt/panoptic-batch
COPY constraints.txt pyproject.toml README.md ./
RUN pip install --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch torchvision
COPY storage ./storage
COPY scheduler ./scheduler
COPY worker ./worker
RUN pip install -c constraints.txt . "flower==${FLOWER_VERSION}" \
    && python -c "import torch; assert torch.version.cuda is None, 'expected the CPU build of torch'; print('torch', torch.__version__)" \
    && panoptic-batch --version

RUN useradd --create-home --home-dir /home/panoptic --uid 10001 --user-group --shell /usr/sbin/nologin panoptic \
    && mkdir -p /var/cache/torch \
    && chown panoptic:panoptic /var/cache/torch
ENV TORCH_HOME=/var/cache/torch \
    PANOPTIC_BROKER_URL=redis://redis:6379/0

# Numeric, so that orchestrators can verify it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
WORKDIR /home/panoptic

ENTRYPOINT ["panoptic-batch"]
CMD ["--help"]
