# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo_output

.PHONY: demo test venv browser clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

# The report test renders the HTML report in headless Chromium: install Debian's package when we can.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: no chromium and no root to install it: the report's browser test will be skipped"

demo: venv
	$(BIN)/nnxai demo --out $(DEMO_OUT)

test: venv browser
	$(BIN)/python -m pytest -ra --durations=15 --timeout=1800 tests

clean:
	rm -rf $(VENV) $(DEMO_OUT)
