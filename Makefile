# fedtensor — developer entry points.  `make demo` and `make test` set up .venv themselves.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.fedtensor-installed
DEMO_INPUT ?= examples/data/ct_head_uint8.nii.gz
DEMO_OUT   ?= results/demo
PYTEST_ARGS ?= -q

.PHONY: venv demo test fuzz browser clean

venv: $(STAMP)

# Re-installs only when the packaging metadata or the C source changes (the install is editable: Python
# edits need none; the compiled context coder and range coder are rebuilt from fedtensor/codec/*.c).
$(STAMP): pyproject.toml setup.py fedtensor/codec/_contexts.c fedtensor/codec/_range.c
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 found on PATH" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: Python >= 3.11 is required, found " + sys.version.split()[0])'
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: venv
	DEMO_OUT="$(DEMO_OUT)" PYTHON="$(VPY)" bash examples/demo.sh "$(DEMO_INPUT)"

test: venv browser
	$(VPY) -m pytest $(PYTEST_ARGS)

# The property tests (decoders, parsers, codec round trips) with fresh random examples on each run;
# `make test` replays a fixed set. Repeat it to explore further.
fuzz: venv
	HYPOTHESIS_PROFILE=explore $(VPY) -m pytest -q -p no:cacheprovider $$(grep -l '@given' tests/*.py)

# tests/test_browser.py drives Debian's headless Chromium through its chromedriver (never a downloaded
# browser); installed here when missing and apt-get is usable. FEDTENSOR_NO_BROWSER=1 skips those tests.
browser:
	@if [ "$$FEDTENSOR_NO_BROWSER" != 1 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then \
	    if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
	            || echo "warning: could not install chromium; the browser tests will fail (FEDTENSOR_NO_BROWSER=1 skips them)" >&2; \
	    else echo "warning: /usr/bin/chromium missing: install Debian's chromium and chromium-driver, or set FEDTENSOR_NO_BROWSER=1" >&2; fi; \
	fi

clean:
	rm -rf build dist *.egg-info results test-artifacts .pytest_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
