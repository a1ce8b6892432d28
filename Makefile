# The two Quickstart commands. Both set up .venv first (tools/setup.sh, idempotent).
.PHONY: setup demo test

setup:
	bash tools/setup.sh

demo: setup
	.venv/bin/frugal-qat demo

test: setup
	.venv/bin/python -m pytest -q
