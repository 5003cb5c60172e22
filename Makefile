# Two commands for a fresh machine (see README):
#   make demo   set up and generate text with the default model
#   make test   set up and run the whole test suite
#   make serve  set up and serve the default model on http://127.0.0.1:8000 (SERVE_ARGS="--port 9000 ...")
PROMPT ?= Explain in two sentences why the sky is blue.
ARGS ?= --chat
SERVE_ARGS ?=

.PHONY: setup browser demo test test-compile serve
setup:
	@bash scripts/setup.sh

browser:  # Debian's chromium for the page test (only `make test` needs it)
	@bash scripts/setup_browser.sh

demo: setup
	.venv/bin/twotower generate "$(PROMPT)" $(ARGS)

serve: setup
	.venv/bin/twotower serve $(SERVE_ARGS)

test: setup browser
	.venv/bin/python -m pytest -q

# torch.compile'd decoding of every strategy == eager (tests/test_compiled.py; minutes of compilation)
test-compile: setup
	.venv/bin/python -m pytest -q -m compile tests/test_compiled.py
