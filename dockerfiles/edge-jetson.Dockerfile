# The edge runtime on Jetson (JetPack 6.1/6.2: L4T r36.4, TensorRT 10.3.0.30, CUDA 12.6, Python 3.10), for the
# edge-runtime chart. These L4T TensorRT images need L4T r36.4 on the host; JetPack 6.0 (r36.3) ships TensorRT 8.6.
# Build on an arm64 host or with buildx:
#   docker buildx build --platform linux/arm64 -f dockerfiles/edge-jetson.Dockerfile -t ghcr.io/edgeloop/edge-runtime-jetson:0.1.0 .
FROM nvcr.io/nvidia/l4t-tensorrt:r10.3.0-devel AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgeloop_core ./edgeloop_core
COPY edge_runtime ./edge_runtime
COPY edgeloop ./edgeloop
RUN python3 -m venv --system-site-packages /opt/edgeloop \
 && /opt/edgeloop/bin/pip install ".[edge]" "cuda-python==12.6.0"

FROM nvcr.io/nvidia/l4t-tensorrt:r10.3.0-runtime
# Triton's runtime libraries: the packages of the "Runtime Dependencies for Triton" in Triton's Jetson guide
# (docs/user_guide/jetson.md: libb64, re2, OpenSSL, libarchive, OpenBLAS, zlib), by their Ubuntu 22.04 names, plus
# libnuma and the libpython3.10 that the Python backend's stub embeds. Their versions are those of the L4T image's
# Ubuntu release (not pinned: the apt sources move with security updates); the ldd check below is the guard.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libb64-0d libre2-9 libssl3 libarchive13 libopenblas0 zlib1g \
      libnuma1 libpython3.10 \
 && rm -rf /var/lib/apt/lists/*
# NVIDIA Triton for EDGE_SERVING_ENGINE=triton (the chart's serving.engine): Triton's JetPack build, the "igpu" tarball
# of a release whose TensorRT matches the image (Triton 2.49.0, NGC 24.08, is built on TensorRT 10.3), unpacked to
# /opt/tritonserver. Check the release notes' Jetson section for your JetPack before changing TRITON_VERSION.
ARG TRITON_VERSION=2.49.0
ADD https://github.com/triton-inference-server/server/releases/download/v${TRITON_VERSION}/tritonserver${TRITON_VERSION}-igpu.tar /tmp/tritonserver.tar
RUN mkdir -p /opt/tritonserver && tar -xf /tmp/tritonserver.tar -C /opt/tritonserver --strip-components=1 \
 && rm /tmp/tritonserver.tar
COPY --from=build /opt/edgeloop /opt/edgeloop
# Fail the build, not the device, when the base image has no TensorRT Python module (found, not imported: importing
# it needs a GPU, which a build host does not have).
RUN /opt/edgeloop/bin/python -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('tensorrt') else 'the tensorrt Python module is missing from this base image: use an L4T TensorRT image that has python3-libnvinfer')"
# Fail the build when tritonserver, the backends edgeloop uses (Triton's onnxruntime, tensorrt and python), TensorRT's
# Python module or ONNX Runtime's needs a library this image does not have (ldd: "not found"). libcuda and the Tegra
# libraries are not looked for: the NVIDIA container runtime mounts them from the host at run time.
COPY dockerfiles/check_libraries.py /opt/edgeloop/check_libraries.py
RUN LD_LIBRARY_PATH=/opt/tritonserver/lib /opt/edgeloop/bin/python /opt/edgeloop/check_libraries.py \
      --host-provided "libcuda.so*" --host-provided "libnvrm*" --host-provided "libnvos.so" \
      --host-provided "libnvsocsys.so" --host-provided "libnvtegrahv.so" --host-provided "libnvcudla.so" \
      --host-provided "libnvdla*" --module tensorrt --module onnxruntime \
      /opt/tritonserver/bin/tritonserver /opt/tritonserver/lib /opt/tritonserver/backends/onnxruntime \
      /opt/tritonserver/backends/tensorrt /opt/tritonserver/backends/python
# EDGE_TRITON_HOME: ONNX Runtime engines run in Triton's onnxruntime backend (EDGE_TRITON_BACKEND=auto); where the
# Python backend serves instead, its stub finds this venv (numpy, onnxruntime) through the python3 first on PATH.
ENV PATH=/opt/edgeloop/bin:$PATH PYTHONUNBUFFERED=1 EDGE_CACHE_DIR=/var/cache/edgeloop \
    EDGE_TRITON_HOME=/opt/tritonserver
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp edgeloop
USER 10001
WORKDIR /tmp
EXPOSE 8001 8002 8005 9091
ENTRYPOINT ["edgeloop"]
CMD ["edge", "serve"]
