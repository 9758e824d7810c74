#!/usr/bin/env bash
# Make .venv a link to a cached virtual environment keyed by the hash of what it pins.
#
# The environment is ~5.6 GB (the CUDA build of torch, needed to compile the CUDA extension). Every
# fresh clone building its own copy would fill the disk, so environments live in
# ${GMEM_VENV_CACHE:-~/.cache/gmem/venvs}/<hash> and a clone only links to one. A new machine builds
# it from nothing. The marker `.complete` is written last, so an interrupted build is redone; a lock
# keeps two clones from building the same environment at once.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
cache_root=${GMEM_VENV_CACHE:-$HOME/.cache/gmem/venvs}
key=$( { cat constraints.txt requirements-dev.txt; "$PYTHON" -c 'import sys; print(sys.version)'; } \
       | sha256sum | cut -c1-16)
target="$cache_root/$key"
mkdir -p "$cache_root"

(
    flock 9
    if [ ! -f "$target/.complete" ]; then
        echo "gmem: building the environment $target (first time on this machine, ~2 minutes)"
        rm -rf "$target"
        "$PYTHON" -m venv "$target"
        "$target/bin/pip" install --quiet --disable-pip-version-check \
            -r requirements-dev.txt -c constraints.txt
        touch "$target/.complete"
    fi
) 9>"$cache_root/.lock-$key"

ln -sfn "$target" .venv
