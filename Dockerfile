# graftq worker image: the CLI plus the worker extra (torch, transformers, peft) and the
# PostgreSQL driver. docker-compose.yml runs it as `graftq worker --gpus all` and, for the
# one-shot schema migration, `alembic upgrade head` from /app (where alembic.ini is).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRAFTQ_ARTIFACTS_DIR=/srv/graftq/artifacts \
    HF_HOME=/srv/graftq/hf-cache

# A fixed uid, so that a bind-mounted or NFS artifacts directory can be chowned to it.
# The directories are created here, owned by that user, because a fresh named volume
# mounted over them copies their ownership: the non-root worker can write to it.
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin graftq \
    && mkdir -p /srv/graftq/artifacts /srv/graftq/hf-cache \
    && chown -R graftq:graftq /srv/graftq

WORKDIR /app

# On a GPU host the default torch wheel from PyPI is the CUDA build, which is what the
# workers want (it bundles the CUDA runtime; the host needs only the NVIDIA driver and
# container toolkit). For a CPU-only image pass a pinned CPU build first, e.g.
#   docker build --build-arg TORCH_SPEC="torch==2.13.0 --index-url <a CPU wheel index>" .
ARG TORCH_SPEC=""
RUN if [ -n "$TORCH_SPEC" ]; then pip install $TORCH_SPEC; fi

# Dependencies first, from pyproject.toml alone, so that editing the source does not
# re-download torch: install against empty packages, then drop graftq itself.
COPY pyproject.toml ./
RUN mkdir -p jobs db worker \
    && touch jobs/__init__.py db/__init__.py worker/__init__.py README.md \
    && pip install '.[worker,postgres,s3]' \
    && pip uninstall -y graftq \
    && rm -rf jobs db worker README.md build ./*.egg-info

COPY . .
RUN pip install --no-deps . && rm -rf build ./*.egg-info

USER graftq

# No ENTRYPOINT: compose gives full commands (`graftq worker ...`, `alembic upgrade head`),
# and `docker run IMAGE graftq results` reads the same way.
CMD ["graftq", "--help"]
