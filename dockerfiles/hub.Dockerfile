# The telemetry hub, for the telemetry-hub chart.
#   docker build -f dockerfiles/hub.Dockerfile -t ghcr.io/edgeloop/telemetry-hub:0.1.0 .
FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgeloop_core ./edgeloop_core
COPY edge_runtime ./edge_runtime
COPY edgeloop ./edgeloop
COPY telemetry_hub ./telemetry_hub
RUN python -m venv /opt/edgeloop && /opt/edgeloop/bin/pip install ".[hub]"

FROM python:3.11.11-slim-bookworm
COPY --from=build /opt/edgeloop /opt/edgeloop
ENV PATH=/opt/edgeloop/bin:$PATH PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp edgeloop
USER 10001
WORKDIR /tmp
EXPOSE 50052
ENTRYPOINT ["edgeloop"]
CMD ["hub", "serve"]
