#!/usr/bin/env bash
# Install the SLURM daemons, clients and munge from Debian's packages, for the SLURM tests (tests/test_slurm.py).
# The tests start a private single-node cluster in a temporary folder (tests/slurm_cluster.py), so nothing here
# configures or starts anything: this only makes the binaries exist. Idempotent: does nothing when they already do.
set -euo pipefail
NEEDED="sbatch slurmctld slurmd munged"
missing=""
for binary in $NEEDED; do
  # munged and the slurm daemons live in sbin, which a non-login PATH may lack.
  if ! PATH="$PATH:/usr/sbin:/sbin" command -v "$binary" >/dev/null 2>&1; then missing="$missing $binary"; fi
done
if [ -z "$missing" ]; then
  echo "slurm already installed"; exit 0
fi
PACKAGES="slurmctld slurmd slurm-client munge"
if [ "$EUID" -ne 0 ]; then
  echo "missing:$missing; install them as root: apt-get install --no-install-recommends $PACKAGES" >&2
  exit 1
fi
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PACKAGES
