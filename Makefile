# Two commands do all the set-up on a fresh machine (Python 3.10+ with venv):
#   make demo   creates .venv, installs the package, runs the whole incremental protocol on the built-in dataset
#   make test   creates .venv, installs the package, builds inplace-abn, installs SLURM (root), runs the test suite
# `make demo METHOD=FT` runs the same protocol with fine-tuning to show forgetting; `make demo METHOD=CIL` with CIL.
# `make demo-city` runs CIL's three-stage protocol (no background, stages on their own cities) on built-in street
# scenes; `make demo-city METHOD=FT` the same with fine-tuning.
# `make benchmark` runs every method of BENCH_METHODS on shapes-hue 6-2 plus the joint (offline) upper bound, with
# 3 seeds, step 0 trained once per step-0 configuration and seed, and writes benchmark.md/.csv/.png into
# checkpoints/step/shapes-hue-6-2/.
# `make benchmark-city` does the same on CIL's own protocol (city-shapes, three stages, no background) for the
# methods that do not model a background class, into checkpoints/step/city-shapes-5-6-8/.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
IABN_STAMP := $(VENV)/.inplace-abn
SLURM_STAMP := $(VENV)/.slurm

METHOD ?= MiB
TASK ?= 6-2
NPROC ?= 2
# Step 0: 4 epochs at lr 0.05 (from scratch); later steps: 2 epochs at lr 0.01. Output stride 8: at 64 px, OS16
# leaves a 4x4 score map. Channels-last convolutions are ~25% faster on CPU. Tuning notes: README "The demo".
DEMO_FLAGS ?= --dataset shapes --data_root data --backbone resnet18 --output_stride 8 --norm_act iabn --channels_last \
	--crop_size 64 --batch_size 16 --epochs 2 --lr 0.01 --num_workers 0 --val_interval 0 --print_interval 25 \
	--student_init previous
# city-shapes: ERFNet and CIL's training setup come from tasks/city-shapes.toml; 15 epochs per stage.
CITY_FLAGS ?= --dataset city-shapes --data_root data --task cil --batch_size 16 --epochs 15 --num_workers 0 \
	--val_interval 0 --print_interval 20
CITY_METHOD := $(if $(filter command line,$(origin METHOD)),$(METHOD),CIL)

# The benchmark: one comma-separated list (extend it, e.g. BENCH_METHODS=FT,MiB,PLOP), each method run with every
# seed of BENCH_SEEDS (each seed its own shared step 0s; the table gives mean ± standard deviation). Sized to run in
# under 30 minutes on 2 CPU cores (README "Comparing methods"): shapes-hue (each class its own hue: step 0 reaches
# 60 % or more in 2 epochs), output stride 16, two single-thread steps at once (BENCH_JOBS). Schedule as the papers
# set it relative to step 0 (MiB, PLOP, ILT and the baselines in MiB's code: the same epochs, a tenth of the lr):
# step 0 2 epochs at lr 0.05, later steps 2 epochs at 0.005. WILSON: its pseudo-labels from epoch 1 of 2 (its
# scripts: 5 of 40), its preset head lr (x10). EWC, PI and RW: MiB's weights (500, 500, 100) were set for its
# steps' lr 0.001; a quadratic penalty's pull per update is lr x weight, so at 5x the lr they get a fifth of the
# weight (at 500 with importances rescaled to [0, 1], lr x curvature reaches 5, past SGD's ~3.8 with momentum 0.9:
# EWC and PI diverged). DKD and STAR (and their -M variants, marked in the table): their scripts' lr is a tenth of
# MiB's (1e-3 at step 0, 1e-4 later, with the head at 10x), so they train at 0.005 and 0.0005 here (at 0.05 their
# heads' 0.5 left step 0 at 16-19 % mIoU; at 0.005 DKD's reached 61 %); their memories keep VOC's share of the
# training set (DKD-M 100 and STAR-M 50 of VOC's 10,582 images: 15 and 8 of shapes-hue's 1,600).
BENCH_METHODS ?= FT,LwF,LwF-MC,ILT,EWC,PI,RW,MiB,PLOP,CIL,WILSON,DKD,STAR,DKD-M,STAR-M
BENCH_SEEDS ?= 0,1,2
BENCH_INITIAL_EPOCHS ?= 2
BENCH_EPOCHS ?= 2
BENCH_JOBS ?= 2
BENCH_FLAGS ?= --dataset shapes-hue --data_root data --backbone resnet18 --output_stride 16 --norm_act iabn \
	--channels_last --crop_size 64 --batch_size 16 --lr 0.005 --num_workers 0 --val_interval 0 --print_interval 25 \
	--student_init previous
# CIL's protocol (README "Comparing methods"): ERFNet and CIL's Adam schedule from tasks/city-shapes.toml, with the
# seeds of BENCH_SEEDS; 10 epochs per stage (`make demo-city` trains 15) so that the three seeds take ~25 minutes on
# 2 cores. MiB, PLOP and WILSON model a background class, which city-shapes has not.
BENCH_CITY_EPOCHS ?= 10
BENCH_CITY_METHODS ?= FT,LwF,ILT,CIL
comma := ,
# --method_flags "M=FLAGS" for a method of BENCH_METHODS only (benchmark.py refuses flags for a method not run)
bench_flags_for = $(if $(filter $(1),$(subst $(comma), ,$(BENCH_METHODS))),--method_flags "$(1)=$(2)")
BENCH_METHOD_FLAGS := $(call bench_flags_for,WILSON,--pseudo_ep 1) $(call bench_flags_for,EWC,--reg_importance 100) \
	$(call bench_flags_for,PI,--reg_importance 100) $(call bench_flags_for,RW,--reg_importance 20) \
	$(call bench_flags_for,DKD,--initial_lr 0.005 --lr 0.0005) $(call bench_flags_for,STAR,--initial_lr 0.005 --lr 0.0005) \
	$(call bench_flags_for,DKD-M,--initial_lr 0.005 --lr 0.0005 --mem_size 15) \
	$(call bench_flags_for,STAR-M,--initial_lr 0.005 --lr 0.0005 --mem_size 8)

.PHONY: demo demo-city compare-wilson benchmark benchmark-city test venv iabn slurm clean-demo gpu-check \
	gpu-check-rehearsal gpu-vendor

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# inplace-abn 1.1.0 ships only an sdist that needs help to build (tools/build_inplace_abn.sh says how; README "Norm layers").
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
	$(PY) launch/run_protocol.py --nproc_per_node $(NPROC) --initial_epochs 4 --initial_lr 0.05 -- \
		$(DEMO_FLAGS) --task $(TASK) --method $(METHOD) --name $(METHOD)

demo-city: $(STAMP)
	$(PY) launch/run_protocol.py --nproc_per_node $(NPROC) -- $(CITY_FLAGS) --method $(CITY_METHOD) --name $(CITY_METHOD)

# WILSON (step 1 from image labels only) beside MiB (full masks) on shapes 6-4, the same schedule for both (step 1:
# 5 epochs at lr 0.01). WILSON's localizer gets 2 epochs before its pseudo-labels supervise (--pseudo_ep), and its
# head keeps the step's lr (--lr_head 1): at 10x the paper's lr, the preset's x10 put it at 0.1 and cost 7 points of
# old-class mIoU. README "WILSON on shapes".
compare-wilson: $(STAMP)
	$(PY) launch/compare.py --methods MiB,WILSON --nproc_per_node $(NPROC) --initial_epochs 4 --initial_lr 0.05 \
		--method_flags "WILSON=--pseudo_ep 2 --lr_head 1 --val_interval 1" -- $(DEMO_FLAGS) --task 6-4 --epochs 5

benchmark: $(STAMP)
	$(PY) launch/benchmark.py --methods $(BENCH_METHODS) --seeds $(BENCH_SEEDS) --nproc_per_node 1 \
		--jobs $(BENCH_JOBS) --initial_epochs $(BENCH_INITIAL_EPOCHS) --initial_lr 0.05 $(BENCH_METHOD_FLAGS) -- \
		$(BENCH_FLAGS) --task 6-2 --epochs $(BENCH_EPOCHS)

benchmark-city: $(STAMP)
	$(PY) launch/benchmark.py --methods $(BENCH_CITY_METHODS) --seeds $(BENCH_SEEDS) --nproc_per_node 1 \
		--jobs $(BENCH_JOBS) -- $(CITY_FLAGS) --epochs $(BENCH_CITY_EPOCHS) --student_init previous

# Everything GPU-related in one run of under 8 minutes and one report (README "GPU checks"). On the GPU machine it
# uses that machine's own Python (no venv: nothing can be downloaded there) and installs this tree with --no-deps.
gpu-check:
	bash benchmarks/gpu_check.sh

# The same script, every part shrunk, on the CPU, in under a minute (the tests run it too).
gpu-check-rehearsal: $(STAMP)
	GPU_CHECK_PYTHON=$(PY) bash benchmarks/gpu_check.sh --rehearsal

# What the GPU machine cannot download: inplace-abn's sdist and setuptools_scm's wheel, into vendor/ (git-ignored),
# to carry with the tree there.
gpu-vendor: $(IABN_STAMP)
	SETUPTOOLS_SCM_PRETEND_VERSION=1.1.0 $(PY) -m pip download --quiet --no-deps --no-build-isolation \
		--no-binary inplace-abn -d vendor inplace-abn==1.1.0
	$(PY) -m pip download --quiet --no-deps -d vendor setuptools_scm==8.1.0
	ls -l vendor

test: $(STAMP) $(IABN_STAMP) $(SLURM_STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf checkpoints/step/shapes-* logs/shapes-* checkpoints/step/city-shapes-* logs/city-shapes-*
