# The two quickstart commands: `make quickstart` and `make test`. Both create the virtual
# environment on first use (python3 -m venv + pip install -e '.[dev]') and reuse it after.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= data
STAMP := $(VENV)/.effvid-installed
export EFFVID_DATA := $(DATA)

.PHONY: install data quickstart test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Moving digits -> mp4 files -> WebDataset shards (re-running skips finished work).
data: $(STAMP)
	$(BIN)/effvid-data digits --out $(DATA)/digits/videos --num-videos 2000 --num-val 64 --seed 0
	$(BIN)/effvid-data shard --input $(DATA)/digits/videos/train --out $(DATA)/digits/shards/train --shard-size 250
	$(BIN)/effvid-data shard --input $(DATA)/digits/videos/val --out $(DATA)/digits/shards/val --shard-size 32

# The quickstart's frozen text tower: its caption-clip pretraining stage, run once.
TEXT_TOWER := runs/digits-text/checkpoints/last.ckpt
$(TEXT_TOWER): | data
	$(BIN)/effvid-train experiment=digits_text_pretraining run_id=digits-text

# The run's validation at its last step samples and scores its final weights (50 videos, 5 per
# prompt) and prints the scores: a separate effvid-sample pass would draw the same videos again.
quickstart: data $(TEXT_TOWER)
	$(BIN)/effvid-train experiment=digits_quickstart
	$(BIN)/effvid-runs list

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop while editing: the suite without the tests marked slow (2 s or more on 2
# cores: real training runs, CLIs, diffusers pipelines); `make test` before a merge.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(DATA) runs
