VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vidgen-installed

.PHONY: setup test test-fast demo finetune-demo stream-demo audio-demo bench clean

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile tests

demo: $(STAMP)
	bash scripts/demo.sh

finetune-demo: $(STAMP)
	bash scripts/finetune_demo.sh

stream-demo: $(STAMP)
	bash scripts/stream_demo.sh

audio-demo: $(STAMP)
	bash scripts/audio_demo.sh

bench: $(STAMP)
	$(PY) bench/data_throughput.py

clean:
	rm -rf $(VENV) outputs runs data
