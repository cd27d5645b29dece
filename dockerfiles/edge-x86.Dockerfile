# The edge runtime on x86-64 without a GPU (ONNX Runtime on the CPU).
#   docker build -f dockerfiles/edge-x86.Dockerfile -t ghcr.io/edgeloop/edge-runtime-x86:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_runtime ./edge_runtime
COPY edgeloop ./edgeloop
RUN python -m venv /opt/edgeloop && /opt/edgeloop/bin/pip install ".[edge]"

FROM python:3.11.11-slim-bookworm
COPY --from=build /opt/edgeloop /opt/edgeloop
ENV PATH=/opt/edgeloop/bin:$PATH PYTHONUNBUFFERED=1 EDGE_CACHE_DIR=/var/cache/edgeloop
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp edgeloop
USER 10001
WORKDIR /tmp
EXPOSE 8001 9091
ENTRYPOINT ["edgeloop"]
CMD ["edge", "serve"]
