"""Shared fixtures. `shapes_root`: a tiny shapes dataset. `slurm_cluster`: a private single-node SLURM cluster for the tests marked `slurm`."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from segmentation.datasets import ensure_shapes
from slurm_cluster import SlurmCluster, missing_binaries


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    """A small generated shapes set shared by the end-to-end tests; run.py takes the folder itself as --data_root."""
    return ensure_shapes(tmp_path_factory.mktemp("data"), size=32, n_train=48, n_val=16)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Started once per session, stopped (jobs cancelled, daemons ended by pid) at the end. Missing SLURM binaries
    fail the tests rather than skip them: a skipped cluster test would hide that SLURM support went untested."""
    missing = missing_binaries()
    if missing:
        pytest.fail(f"SLURM binaries missing ({', '.join(missing)}): run `make test`, which installs them with "
                    "tools/install_slurm.sh (as root), or deselect these tests with -m 'not slurm'", pytrace=False)
    with SlurmCluster() as cluster:
        yield cluster
