#!/usr/bin/env bash
# Installs the Debian 12 packages gradmap needs to build, test and report, skipping those
# already installed (idempotent; returns in about a second when nothing is missing).
set -euo pipefail
pkgs=(
  g++ make cmake pkg-config
  libopenmpi-dev openmpi-bin
  libpetsc-real-dev libscalapack-openmpi-dev libhdf5-openmpi-dev hdf5-tools
  libboost-program-options-dev libtorch-dev libgtest-dev libopenblas-dev
  python3-numpy python3-h5py python3-torch python3-torchvision python3-sklearn python3-scipy
  python3-statsmodels python3-matplotlib python3-nibabel python3-pandas python3-mne python3-pil
  zlib1g-dev libjpeg-dev
  chromium
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#pkgs[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
