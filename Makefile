.PHONY: install test lint format

install:
	scripts/setup-venv.sh

test:
	scripts/test.sh

lint:
	scripts/setup-venv.sh
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .
