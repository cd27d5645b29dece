# The edge runtime on Jetson (JetPack 6: L4T r36, TensorRT 10.3, Python 3.10), for the edge-runtime chart.
# Build on an arm64 host or with buildx:
#   docker buildx build --platform linux/arm64 -f dockerfiles/edge-jetson.Dockerfile -t ghcr.io/edgeloop/edge-runtime-jetson:0.1.0 .
FROM nvcr.io/nvidia/l4t-tensorrt:r10.3.0-devel AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_runtime ./edge_runtime
COPY edgeloop ./edgeloop
RUN python3 -m venv --system-site-packages /opt/edgeloop \
 && /opt/edgeloop/bin/pip install ".[edge]" "cuda-python==12.6.0"

FROM nvcr.io/nvidia/l4t-tensorrt:r10.3.0-runtime
COPY --from=build /opt/edgeloop /opt/edgeloop
ENV PATH=/opt/edgeloop/bin:$PATH PYTHONUNBUFFERED=1 EDGE_CACHE_DIR=/var/cache/edgeloop
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp edgeloop
USER 10001
WORKDIR /tmp
EXPOSE 8001 9091
ENTRYPOINT ["edgeloop"]
CMD ["edge", "serve"]
