# The image every pipeline step runs in (components/steps.py: COMPONENT_IMAGE).
# Build from the repository root:  docker build -f dockerfiles/cloud.Dockerfile -t ghcr.io/edgeloop/edgeloop-cloud:0.1.0 .
# TORCH_INDEX picks the torch build: the CPU wheels by default, a CUDA index for GPU training nodes.
FROM python:3.11.11-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/edgeloop \
 && /opt/edgeloop/bin/pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY edgeloop_core ./edgeloop_core
COPY edge_runtime ./edge_runtime
COPY components ./components
COPY pipelines ./pipelines
COPY edgeloop ./edgeloop
COPY telemetry_hub ./telemetry_hub
RUN /opt/edgeloop/bin/pip install ".[cloud]" \
 && /opt/edgeloop/bin/pip install --no-deps torchprofile==0.0.4 onnx-graphsurgeon==0.6.1 onnxslim==0.1.98 \
      polygraphy==0.53.6 lief==1.0.0 cppimport==26.4.17 onnxconverter-common==1.16.0

FROM python:3.11.11-slim-bookworm
COPY --from=build /opt/edgeloop /opt/edgeloop
ENV PATH=/opt/edgeloop/bin:$PATH PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/matplotlib
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp edgeloop
USER 10001
WORKDIR /tmp
ENTRYPOINT ["edgeloop"]
CMD ["pipeline", "params"]
