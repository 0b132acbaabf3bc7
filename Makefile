# The two commands a newcomer needs: `make run` and `make test`.
# Both create (or refresh, when pyproject.toml changes) the virtualenv first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml 2>/dev/null | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: proto venv run test test-fast test-natlab test-browser bench bench-anchors lint docs clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

run: venv
	$(BIN)/python -m swarmd.demo

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -q -m "not natlab and not slow" $(PYTEST_ARGS)

test-natlab: venv
	$(BIN)/python -m pytest -q -m natlab $(PYTEST_ARGS)

test-browser: venv
	$(BIN)/python -m pytest -q -m browser $(PYTEST_ARGS)

bench: venv
	@set -e; for f in bench/*.py; do \
	  case $$f in bench/models.py|bench/anchors.py) continue;; esac; \
	  echo "== $$f"; $(BIN)/python $$f; done

# swarmd beside the Hyperswarm anchors and FastAPI, alternating, one ratio table (needs node + npm)
bench-anchors: venv
	$(BIN)/python bench/anchors.py

# regenerate the OIP gRPC messages from swarmd/gateway/proto/oip.proto, in a descriptor pool of
# their own (tritonclient ships the same protobuf package; one process may load both)
proto: venv
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. swarmd/gateway/proto/oip.proto
	sed -i 's/_descriptor_pool.Default().AddSerializedFile(/_descriptor_pool.DescriptorPool().AddSerializedFile(/' \
	  swarmd/gateway/proto/oip_pb2.py

docs: venv
	$(BIN)/python -m swarmd.docs_config

lint: venv
	$(BIN)/ruff check swarmd swarmd_rpc tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .run
