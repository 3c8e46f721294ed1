#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
# Download the wheels that berdiff needs beyond a CUDA PyTorch image (Python 3.12, x86-64: numpy, scipy, scikit-learn,
# scikit-image, tensorboard, pyyaml, Pillow already there) into DEST (default .whl, git-ignored), on a machine with the
# package index; scripts/gpu_report.sh installs them on the GPU machine (docs/benchmarks.md, "GPU run").
#   bash scripts/fetch_wheels.sh [DEST]
set -euo pipefail
DEST=${1:-.whl}
mkdir -p "$DEST"
for p in monai==1.6.1 nibabel==5.4.2 fire==0.7.1 termcolor==3.3.0 pytorch-ignite==0.5.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "$p"
done
ls "$DEST"
