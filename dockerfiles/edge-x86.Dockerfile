# The edge runtime on x86-64 without a GPU (ONNX Runtime on the CPU).
#   docker build -f dockerfiles/edge-x86.Dockerfile -t ghcr.io/edgeloop/edge-runtime-x86:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgeloop_core ./edgeloop_core
COPY edge_runtime ./edge_runtime
COPY edgeloop ./edgeloop
RUN python -m venv /opt/edgeloop && /opt/edgeloop/bin/pip install ".[edge]"
# EDGE_SERVING_ENGINE=triton: the tritonserver inside the nvidia-pytriton wheel (the binary the tests run), in a venv
# of its own (it needs numpy<2), with the same onnxruntime for edgeloop's ONNX Runtime engines, which Triton's Python
# backend runs (the wheel has no onnxruntime backend). edgeloop's own Triton backend (opt-in: EDGE_TRITON_BACKEND=
# edgeloop), which runs them inside tritonserver with that venv's interpreter, is prebuilt into the package here, with
# a pinned C compiler from PyPI (zig's), so the runtime image needs none.
RUN python -m venv /opt/triton \
 && /opt/triton/bin/pip install "nvidia-pytriton==0.7.0" "numpy<2" \
      "onnxruntime==$(/opt/edgeloop/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)')" \
 && python -m venv /opt/compiler && /opt/compiler/bin/pip install "ziglang==0.17.1" \
 && CC="/opt/compiler/bin/python -m ziglang cc -mcpu=baseline" \
      /opt/edgeloop/bin/edgeloop edge triton-backend /opt/triton/bin/python

FROM python:3.11.11-slim-bookworm
COPY --from=build /opt/edgeloop /opt/edgeloop
COPY --from=build /opt/triton /opt/triton
# Fail the build when tritonserver, its Python backend and the stub for this Python, edgeloop's prebuilt backend or
# ONNX Runtime (in either venv) needs a library this image does not have (ldd: "not found").
COPY dockerfiles/check_libraries.py /opt/edgeloop/check_libraries.py
RUN /opt/edgeloop/bin/python /opt/edgeloop/check_libraries.py --module onnxruntime \
      /opt/triton/lib/python3.11/site-packages/pytriton/tritonserver/bin \
      /opt/triton/lib/python3.11/site-packages/pytriton/tritonserver/backends \
      /opt/triton/lib/python3.11/site-packages/pytriton/tritonserver/python_backend_stubs/3.11 \
      /opt/triton/lib/python3.11/site-packages/onnxruntime/capi \
      /opt/edgeloop/lib/python3.11/site-packages/edge_runtime/serve/triton/backend/build
ENV PATH=/opt/edgeloop/bin:$PATH PYTHONUNBUFFERED=1 EDGE_CACHE_DIR=/var/cache/edgeloop \
    EDGE_TRITON_PYTHON=/opt/triton/bin/python
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp edgeloop
USER 10001
WORKDIR /tmp
EXPOSE 8001 8002 8005 9091
ENTRYPOINT ["edgeloop"]
CMD ["edge", "serve"]
