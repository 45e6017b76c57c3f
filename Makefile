# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make demo   creates .venv, installs the package, runs the whole incremental protocol on the built-in dataset
#   make test   creates .venv, installs the package, builds inplace-abn, installs SLURM (root), runs the test suite
# `make demo METHOD=FT` runs the same protocol with fine-tuning to show forgetting.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
IABN_STAMP := $(VENV)/.inplace-abn
SLURM_STAMP := $(VENV)/.slurm

METHOD ?= MiB
TASK ?= 6-2
NPROC ?= 2
DEMO_FLAGS ?= --dataset shapes --data_root data --backbone resnet18 --output_stride 16 --norm_act iabn_sync \
	--crop_size 64 --batch_size 16 --epochs 4 --num_workers 0 --val_interval 0 --print_interval 25 --overlap

.PHONY: demo test venv iabn slurm clean-demo

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# inplace-abn 1.1.0 ships only an sdist that needs help to build (see ../shared notes in README "Norm layers").
iabn: $(IABN_STAMP)

$(IABN_STAMP): $(STAMP)
	bash tools/build_inplace_abn.sh $(PY)
	touch $@

# SLURM's daemons and clients from Debian's packages (apt-get, as root) for the tests that run a private cluster.
slurm: $(SLURM_STAMP)

$(SLURM_STAMP): $(STAMP)
	bash tools/install_slurm.sh
	touch $@

demo: $(STAMP)
	$(PY) launch/run_protocol.py --nproc_per_node $(NPROC) --initial_epochs 4 -- \
		$(DEMO_FLAGS) --task $(TASK) --method $(METHOD) --name $(METHOD)

test: $(STAMP) $(IABN_STAMP) $(SLURM_STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf checkpoints/step/shapes-* logs/shapes-*
