#!/usr/bin/env bash
# Does xmodal run on the oldest versions pyproject.toml declares?
#
# For every dependency (core and extras) whose declared lower bound is a pure-Python wheel that pip can
# fetch here, installs exactly that version (pip install --no-deps) into a scratch venv that sees the
# locked environment (.venv, built from requirements.txt) behind it, so only the lower bounds differ from
# the lock. A lower-bound release that requires an older companion than the lock has (pydantic's exact
# pydantic-core, transformers' tokenizers/huggingface-hub ceilings) gets the newest companion it accepts.
# Then runs a fast subset of the tests against that environment. Compiled distributions (torch, numpy,
# ...) are listed as not tried, with the reason: their wheels are built against the lock's ABI.
#
# Not part of `make test`: 621 s on the shared 2-core development machine at load average 7-12 (about a
# third resolving and fetching the lower bounds, the rest the tests).
# Usage: scripts/check_min_versions.sh [pytest args to replace the default subset]   (KEEP=1 keeps the venv)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
LOCKED="$REPO/.venv"
[ -x "$LOCKED/bin/python" ] || { echo "run 'make venv' first: the locked environment $LOCKED is missing" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xmodal-minver.XXXXXX")
trap '[ "${KEEP:-0}" = 1 ] && echo "kept: $WORK" || rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

"$LOCKED/bin/python" -m venv --without-pip "$WORK/venv"   # no pip/setuptools of its own to shadow the lock's
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
LOCKED_SITE=$("$LOCKED/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

# Decide what to install: the lower bounds (pure-Python wheels only) and the companions they need.
"$LOCKED/bin/python" - "$REPO/pyproject.toml" "$WORK" <<'EOF'
import json, subprocess, sys, tomllib, zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path
from packaging.requirements import Requirement
from packaging.version import Version

pyproject, work = Path(sys.argv[1]), Path(sys.argv[2])
project = tomllib.loads(pyproject.read_text())["project"]
reqs = [Requirement(r) for r in project["dependencies"]]
for extra in project.get("optional-dependencies", {}).values():
    reqs += [Requirement(r) for r in extra if not r.startswith("xmodal")]

def floor(req):
    lows = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    return max(lows, key=Version) if lows else None

def locked(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

def wheel_name(spec):
    """The file name of the wheel pip would pick for ``spec`` (read from its metadata, nothing downloaded)."""
    report = work / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed", "--no-deps",
                        "--only-binary=:all:", "--report", str(report), spec], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    items = json.loads(report.read_text())["install"]
    return items[0]["download_info"]["url"].rsplit("/", 1)[-1].split("#")[0] if items else None

def fetch(spec, dest):
    """Download one wheel of ``spec`` (no dependencies); its path, or None when pip cannot get a wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", str(dest), spec], capture_output=True, text=True)
    new = [p for p in set(dest.iterdir()) - before if p.suffix == ".whl"]
    return new[0] if r.returncode == 0 and new else None

def requires(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode())
    out = []
    for line in msg.get_all("Requires-Dist") or []:
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            out.append(r)
    return out

install, tried, skipped = {}, [], []  # install: distribution name -> wheel
chosen = {}  # distribution name -> version installed over the lock
for req in reqs:
    low, have = floor(req), locked(req.name)
    if low is None:
        skipped.append(f"{req.name}: no lower bound declared")
        continue
    if have is not None and Version(have) == Version(low):
        tried.append(f"{req.name}=={low} (the lock's own version)")
        continue
    name = wheel_name(f"{req.name}=={low}")
    if name is None:
        skipped.append(f"{req.name}=={low}: pip cannot fetch a wheel of it here")
        continue
    if not name.endswith("-none-any.whl"):
        skipped.append(f"{req.name}=={low}: compiled wheel ({name}); only pure-Python lower bounds are mixed "
                       f"into the lock's compiled packages (lock: {have})")
        continue
    wheel = fetch(f"{req.name}=={low}", work / "wheels")
    if wheel is None:
        skipped.append(f"{req.name}=={low}: pip cannot fetch a wheel of it here")
        continue
    install[req.name.lower()] = wheel
    chosen[req.name.lower()] = low
    tried.append(f"{req.name}=={low} (lock: {have})")

for name, wheel in list(install.items()):  # companions: what each lower bound requires must be satisfied
    for dep in requires(wheel):
        key = dep.name.lower().replace("_", "-")
        key = next((k for k in chosen if k.replace("_", "-") == key), key)
        have_dep = chosen.get(key) or locked(dep.name)
        if have_dep is None or not dep.specifier or dep.specifier.contains(have_dep, prereleases=True):
            continue
        if key in chosen:
            skipped.append(f"conflict: {name}=={chosen[name]} needs {dep}, the declared lower bound is {have_dep}")
            continue
        companion = fetch(f"{dep.name}{dep.specifier}", work / "wheels")
        if companion is None:
            skipped.append(f"{name}=={chosen[name]}: needs {dep} (lock has {have_dep}) and pip cannot fetch it")
            continue
        install[key] = companion
        chosen[key] = companion.name.split("-")[1]
        tried.append(f"  companion {dep.name}=={chosen[key]} for {name}=={chosen[name]} "
                     f"(needs {dep.specifier}; lock: {have_dep})")
install = [str(w) for w in install.values()]
(work / "install.txt").write_text("\n".join(install) + "\n")
(work / "summary.txt").write_text("tried:\n  " + "\n  ".join(tried) + "\nnot tried:\n  " + "\n  ".join(skipped) + "\n")
EOF
cat "$WORK/summary.txt"

sed -i '/^$/d' "$WORK/install.txt"
"$LOCKED/bin/python" -m pip --python "$WORK/venv/bin/python" install -q --no-deps -r "$WORK/install.txt"
echo "$LOCKED_SITE" > "$SITE/zz_locked_environment.pth"   # after the venv's own packages: the lower bounds win
echo "== pip check (conflicts between the lower bounds and the rest of the lock; informational; xmodal's own"
echo "   installed metadata in .venv may predate pyproject.toml, so its lines are left out):"
"$LOCKED/bin/python" -m pip --python "$WORK/venv/bin/python" check | grep -v "^xmodal " || true

TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
  # CLI (typer, rich), serve (fastapi, starlette, pydantic, uvicorn, python-multipart, httpx), backbones (open_clip,
  # timm, transformers), classifier + CLIP-LoRA (peft), X-adapter training (accelerate)
  TESTS=(tests/test_extras.py tests/test_cli_errors.py tests/test_cli_foundation.py tests/test_serve_app.py
         tests/test_serve_http.py tests/test_classifier.py tests/test_backbones.py
         tests/test_fewshot_tower_methods.py::test_clip_lora_starts_at_the_frozen_model_and_saves_adapters_only
         tests/test_xadapter_train.py::test_loss_falls_and_outputs -x -q -p no:cacheprovider)
fi
echo "== pytest ${TESTS[*]}"
cd "$REPO"
"$WORK/venv/bin/python" - <<'EOF'
from importlib import metadata
import sys
for name in ("typer", "rich", "fastapi", "starlette", "pydantic", "uvicorn", "transformers", "timm", "open_clip_torch",
             "peft", "accelerate"):
    try:
        print(f"  {name} {metadata.version(name)}", end="")
    except metadata.PackageNotFoundError:
        pass
print()
EOF
"$WORK/venv/bin/python" -m pytest "${TESTS[@]}"
echo "== lower-bound check passed in $(( $(date +%s) - start )) s"
