#!/usr/bin/env bash
# The wheels a lent GPU host (Python 3.12, JAX, no TensorFlow, no internet) needs to run
# benchmarks/gpu_extraction.py: Keras and the two small packages it needs, pydantic for the
# project's typed results, and OpenCV for the default decoder (4.11: its wheel is 48 MiB, the
# newest 59). About 60 MiB in all, under the 64 MiB a device call may carry: carry nothing else
# in that call (or leave OpenCV out and run with --decoder pillow).
# Run from the repository root; `.whl/` is ignored by git.
set -euo pipefail
mkdir -p .whl
for spec in keras==3.15.1 namex==0.1.0 optree==0.20.0 pydantic==2.14.4 pydantic-core==2.50.5 \
            annotated-types==0.7.0 typing-inspection==0.4.2 opencv-python-headless==4.11.0.86; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec"
done
du -sh .whl
