"""The parts of one step, which segmentation/steps.py runs in order: build, train, finish; and whether a
step needs to run at all (existing.py)."""
