.PHONY: install demo test lint format

install:
	scripts/setup-venv.sh

# `make demo KEEP=1` keeps the service running until Ctrl-C.
demo: install
	.venv/bin/python scripts/demo.py $(if $(KEEP),--keep-running)

test:
	scripts/test.sh

lint:
	scripts/setup-venv.sh
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
