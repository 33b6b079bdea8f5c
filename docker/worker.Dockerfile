# GPU worker image: `panoptic-batch worker` on CUDA.
#
#   docker build -f docker/worker.Dockerfile -t panoptic-batch-worker .      (from the repository root)
#   docker run --gpus '"device=0"' -e PANOPTIC_BROKER_URL=… -e PANOPTIC_DATABASE_URL=… -e AWS_…=… \
#       -v panoptic-torch-cache:/var/cache/torch panoptic-batch-worker
#
# torch and torchvision come from the base image and are never replaced: pip installs the project
# under a constraints file that pins them to the base image's versions, so a dependency that asked
# for another torch would fail the build instead of silently pulling a second, multi-GB torch.
# (The repository's constraints.txt pins CI's CPU torch, so it is deliberately not used here.)
#
# The official pytorch/pytorch image for the torch release the GPU machines run (2.11). CUDA 12.8
# runs on NVIDIA drivers >= 570 and covers Hopper (H100/H200) and Blackwell; for hosts with driver
# >= 580, --build-arg BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime works the same.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/panoptic-batch
# Only what the package needs (see /.dockerignore, which lets nothing else into the context).
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY scheduler ./scheduler
COPY worker ./worker

# Pin pip to the base image's torch/torchvision (exact versions, local labels such as +cu128
# included), install the project, then prove torch is still the base image's CUDA build.
RUN pip list --format=freeze | grep -iE '^(torch|torchvision|triton)==' > /tmp/base-image-constraints.txt
RUN cat /tmp/base-image-constraints.txt \
    && pip install -c /tmp/base-image-constraints.txt . \
    && python -c "import torch, torchvision; assert torch.version.cuda, 'torch lost its CUDA build'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__)" \
    && panoptic-batch --version

# Non-root user; the weights cache (TORCH_HOME) is a volume owned by it, so the published
# checkpoints (~170-250 MB each) are downloaded once per volume, not once per container start.
# A fresh named volume takes this folder's owner, so the worker can write to it.
RUN useradd --create-home --home-dir /home/panoptic --uid 10001 --user-group --shell /usr/sbin/nologin panoptic \
    && mkdir -p /var/cache/torch/hub/checkpoints \
    && chown -R panoptic:panoptic /var/cache/torch
ENV TORCH_HOME=/var/cache/torch \
    PANOPTIC_BROKER_URL=redis://redis:6379/0
VOLUME ["/var/cache/torch"]

# Numeric, so that orchestrators can verify it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
WORKDIR /home/panoptic

# Alive and connected: the worker's main process (which keeps consuming broker messages while a
# pool process runs a chunk) must answer a Celery control ping sent through the broker within
# 10 s. Celery names the node celery@<hostname>, and $HOSTNAME is the container's hostname.
# The check imports only worker.queue (Celery, no torch): about 2 s of CPU per run.
HEALTHCHECK --interval=60s --timeout=30s --start-period=60s --retries=3 \
    CMD ["sh", "-c", "celery -A worker.queue inspect ping --destination \"celery@${HOSTNAME}\" --timeout 10 >/dev/null || exit 1"]

# SIGTERM makes Celery stop taking chunks and finish the one it runs (give it time: see
# stop_grace_period in docker-compose.yml); if it is killed anyway, the leases bring its images back.
ENTRYPOINT ["panoptic-batch"]
CMD ["worker", "--device", "cuda"]
