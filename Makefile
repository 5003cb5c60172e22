# Two commands for a fresh machine (see README):
#   make demo   set up and generate text with the default model
#   make test   set up and run the whole test suite
PROMPT ?= Explain in two sentences why the sky is blue.
ARGS ?= --chat

.PHONY: setup demo test
setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/twotower generate "$(PROMPT)" $(ARGS)

test: setup
	.venv/bin/python -m pytest -q
