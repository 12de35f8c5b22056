# Two commands do all the set-up (see README):
#   make quickstart   install the project and run the quickstart pipeline
#   make test         install the project with test extras and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart test install install-test install-server install-engine lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

# the shared MLflow tracking server on PostgreSQL (docs/scaling.md section 2): the project and psycopg
install-server: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[server]"

install-test: $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"

# the vLLM rollout engine in its own environment (engine: vllm; its pins conflict with prefect's), under
# the user cache; a no-op when it is there already
install-engine: install
	$(BIN)/rlhf engine install vllm

quickstart: install
	$(BIN)/rlhf run recipes/quickstart.yaml

# Two workers, each taking whole test modules (module fixtures are set up once), in collection order
# (tests/conftest.py puts the long end-to-end modules first); TEST_WORKERS=0 runs the suite in this one
# process.
TEST_WORKERS ?= 2
test: install-test install-engine
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install-test
	$(BIN)/ruff check .
