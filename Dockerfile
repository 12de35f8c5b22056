# The project's image for docker and kubernetes work pools: the rlhf-pipelines package installed, so a
# worker's job (`prefect flow-run execute`) imports the stage runner by its module path.
#
#   CPU:  docker build -t rlhf-pipelines:cpu .
#   GPU:  docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                      -t rlhf-pipelines:gpu .
#
# Pick the CUDA wheel index that matches the GPU hosts' driver. Jobs get GPUs from their pool (docker
# device requests, kubernetes nvidia.com/gpu limits), not from this image. Push the tag to a registry
# the workers can pull from, and give it to the pool: rlhf pools create gpu --type docker --image TAG.

FROM python:3.12-slim

# torch is pinned exactly, as in pyproject.toml; the index decides the build (CPU by default, so a CPU
# image never pulls the multi-GB CUDA wheels). A CUDA build (2.13.0+cu128) satisfies ==2.13.0 too.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG RLHF_UID=1000

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RLHF_HOME=/var/lib/rlhf

# git: the pipeline records the commit it runs from when there is one ("unknown" in this image).
# Debian's current git (not pinned: the base image's package versions move with its tag).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Dependencies in their own layer: rebuilt when pyproject.toml changes, not on every code change.
WORKDIR /opt/rlhf
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY rlhf_core ./rlhf_core
COPY registry ./registry
COPY tasks ./tasks
COPY flows ./flows
COPY recipes ./recipes
# The sources go once installed: jobs import the installed package by its module path.
RUN pip install --no-deps . \
    && rm -rf rlhf_core registry tasks flows build ./*.egg-info

# Not root. RLHF_HOME holds the MLflow store, stage work dirs and checkpoints when no tracking server is
# set (RLHF_TRACKING_URI); mount shared storage there so a resubmitted stage finds its checkpoints.
RUN useradd --create-home --uid "${RLHF_UID}" rlhf \
    && mkdir -p "${RLHF_HOME}" \
    && chown rlhf:rlhf "${RLHF_HOME}"
# A numeric user, so that kubernetes' runAsNonRoot can check it.
USER ${RLHF_UID}
WORKDIR /home/rlhf

# The package imports as the job's user, from site-packages.
RUN rlhf --help > /dev/null \
    && python -c "import flows.pipeline, torch; print('rlhf-pipelines with torch', torch.__version__)"

VOLUME ["/var/lib/rlhf"]

# Workers pass their own command (prefect flow-run execute); run alone, the image shows the CLI.
CMD ["rlhf", "--help"]
