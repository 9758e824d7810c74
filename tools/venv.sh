#!/usr/bin/env bash
# Make the clone's environment: a small virtual environment of its own over a shared, cached one.
#
# Usage: tools/venv.sh [DIR]   (DIR defaults to .venv; run by `make`, quiet when nothing changes)
#
# The heavy packages (~5.6 GB: the CUDA build of torch, needed to compile the CUDA extension) are
# installed once per machine into ${GMEM_VENV_CACHE:-~/.cache/gmem/venvs}/<hash of what is pinned>.
# A new machine builds it from nothing; the marker `.complete` is written last, so an interrupted
# build is redone, and a lock keeps two clones from building the same environment at once. Nothing
# is ever installed into it afterwards: gmem itself is not, so no clone can change what another sees.
#
# DIR is a real virtual environment (no pip, a few kB) belonging to this clone. A .pth file in its
# site-packages puts, in this order, the clone's root (relative to the .pth file, so the clone may
# be moved) and the shared environment's site-packages on sys.path: `import gmem` is this clone's
# gmem, and `DIR/bin/python -m pip install X` installs into DIR only. DIR/bin holds the console
# scripts of pyproject.toml (`gmem`) and every console script of the shared environment (`torchrun`,
# `pytest`, `pytorch-fid`, ...), all running DIR's python, and links to its native executables (ninja,
# ruff). `make install` then builds the extension in place (gmem/_C*.so).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${1:-.venv}

PYTHON=${PYTHON:-python3}
cache_root=${GMEM_VENV_CACHE:-$HOME/.cache/gmem/venvs}
key=$( { cat constraints.txt requirements-dev.txt requirements-nodeps.txt; "$PYTHON" -c 'import sys; print(sys.version)'; } \
       | sha256sum | cut -c1-16)
shared="$cache_root/$key"
mkdir -p "$cache_root"

(
    flock 9
    if [ ! -f "$shared/.complete" ]; then
        echo "gmem: building the shared environment $shared (first time on this machine, ~2 minutes)"
        rm -rf "$shared"
        "$PYTHON" -m venv "$shared"
        "$shared/bin/pip" install --quiet --disable-pip-version-check \
            -r requirements-dev.txt -c constraints.txt
        # packages whose declared dependencies gmem does not use (see requirements-nodeps.txt)
        "$shared/bin/pip" install --quiet --disable-pip-version-check --no-deps \
            -r requirements-nodeps.txt -c constraints.txt
        touch "$shared/.complete"
    fi
) 9>"$cache_root/.lock-$key"

# DIR/.gmem-shared names the shared environment DIR was made over; it is written last, and only
# when DIR is (re)made, so `make` sees a new environment by its time stamp.
# Its second line is the layout of DIR/bin: a clone made by an older layout is remade.
marker="$venv/.gmem-shared"
stamp=$(printf '%s\nbin-layout 2' "$shared")
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$stamp" ] && [ -x "$venv/bin/python" ]; then
    exit 0
fi

echo "gmem: making $venv (this clone's environment, over $shared)"
if [ -L "$venv" ]; then
    rm -f "$venv"  # earlier versions made DIR a link to the shared environment: drop the link only
fi
rm -rf "$venv"
"$PYTHON" -m venv --without-pip "$venv"
"$venv/bin/python" - "$root" "$venv" "$shared" <<'PY'
import os
import re
import stat
import sys
import sysconfig
from pathlib import Path

root, shared = Path(sys.argv[1]).resolve(), Path(sys.argv[3])
prefix = Path(sys.prefix)                             # DIR (this python is DIR's)
site = Path(sysconfig.get_path("purelib"))            # DIR's site-packages
shared_site = shared / site.relative_to(prefix)       # the same layout inside the shared environment
if not shared_site.is_dir():
    sys.exit(f"gmem: {shared_site} not found (the shared environment is incomplete)")
(site / "_gmem_env.pth").write_text(
    os.path.relpath(root, site.resolve()) + "\n"
    + f"import site; site.addsitedir({str(shared_site)!r})\n")

text = (root / "pyproject.toml").read_text()
try:
    import tomllib

    scripts = tomllib.loads(text)["project"].get("scripts", {})
except ImportError:  # Python 3.10: the [project.scripts] table holds only `name = "module:function"` lines
    table = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.M | re.S)
    scripts = dict(re.findall(r'^([\w.-]+)\s*=\s*"([\w.]+:[\w.]+)"', table.group(1) if table else "", re.M))
bin_dir = prefix / "bin"
for name, target in scripts.items():
    module, func = target.split(":")
    path = bin_dir / name
    path.write_text(f"#!{bin_dir / 'python'}\nimport sys\n\nfrom {module} import {func}\n\n"
                    f"if __name__ == \"__main__\":\n    sys.exit({func}())\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
# The shared environment's programs: native ones are linked; Python console scripts (torchrun, pytest,
# pytorch-fid, ...) are rewritten to run DIR's python, which sees this clone's gmem (the shared python
# does not: `torchrun -m gmem.cli` would start ranks that cannot import gmem).
shared_pythons = {str(shared / "bin" / n) for n in ("python", "python3", f"python3.{sys.version_info[1]}")}
for exe in sorted((shared / "bin").iterdir()):
    target = bin_dir / exe.name
    if not exe.is_file() or not os.access(exe, os.X_OK) or exe.name.startswith("python") or target.exists():
        continue
    head = exe.open("rb").read(2)
    if head != b"#!":
        target.symlink_to(exe)
        continue
    shebang, _, body = exe.read_text().partition("\n")
    if shebang[2:].strip() not in shared_pythons:
        continue  # a script for another interpreter (none today): leave it out rather than guess
    target.write_text(f"#!{bin_dir / 'python'}\n{body}")
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
echo "$stamp" > "$marker"
