#!/usr/bin/env bash
# Does the built package work on its own, away from the repository?
#
# Builds the sdist and, from that sdist, the wheel (python -m build); installs only the wheel with its
# [serve] extra into a clean virtual environment, every dependency pinned to the lock (requirements.txt);
# then, from a folder outside the repository: `xmodal --help`, a tiny:clip zero-shot on a small image
# folder made here, `xmodal fit` + `xmodal serve` with its page, API docs and their vendored assets fetched
# over HTTP on 127.0.0.1 (bounded waits), one image classified through the API; last, with FastAPI
# uninstalled, `xmodal serve` must name the [serve] extra.
#
# Not part of `make test`: it installs the whole lock into a fresh venv (6 GB). 1022 s on the shared 2-core
# development machine at load average ~11, 14 minutes of it pip; the checks after the install take about 90 s.
# Usage: scripts/check_wheel.sh   (KEEP=1 keeps the work folder)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$(command -v python3.11 || command -v python3)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/xmodal-wheel.XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
step() { echo "== [$(( $(date +%s) - start ))s] $*"; }

step "copy the sources (tracked and untracked, not ignored) to $WORK/src"
mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
  | "$PY" -c 'import os, sys; sys.stdout.write("".join(f + "\0" for f in sys.stdin.read().split("\0") if os.path.isfile(f)))' \
  | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"

step "build the sdist, then the wheel from the sdist"
"$PY" -m venv "$WORK/build-venv"
"$WORK/build-venv/bin/pip" install -q build
"$WORK/build-venv/bin/python" -m build --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log"; exit 1; }
ls -l "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/xmodal-*.whl)
SDIST=$(ls "$WORK"/dist/xmodal-*.tar.gz)

step "every non-Python file of the package is in the wheel and in the sdist"
"$PY" - "$REPO" "$WHEEL" "$SDIST" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path
repo, wheel, sdist = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
need = {str(p.relative_to(repo)) for p in (repo / "xmodal").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".py", ".pyc"}}
in_wheel = set(zipfile.ZipFile(wheel).namelist())
in_sdist = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
missing = sorted(need - in_wheel) + sorted(f"(sdist) {n}" for n in need - in_sdist)
print(f"{len(need)} data files; wheel holds {len(in_wheel)} files")
sys.exit(f"missing from the built package: {missing}" if missing else 0)
EOF

step "clean venv: the wheel with [serve], dependencies pinned to the lock"
"$PY" -m venv "$WORK/venv"
V="$WORK/venv/bin"
"$V/pip" install -q -c "$REPO/requirements.txt" "${WHEEL}[serve]"
"$V/pip" check
"$V/pip" list --format=freeze > "$WORK/installed.txt"
echo "$(wc -l < "$WORK/installed.txt") distributions installed"

mkdir -p "$WORK/outside" && cd "$WORK/outside"   # nothing of the repository on sys.path from here
"$V/python" - "$WORK/venv" <<'EOF'
import sys, xmodal
from pathlib import Path
where = Path(xmodal.__file__).resolve()
assert Path(sys.argv[1]).resolve() in where.parents, f"xmodal imported from {where}, not from the wheel"
print("xmodal imported from", where.parent)
EOF

step "xmodal --help"
"$V/xmodal" --help > help.txt
grep -q "serve" help.txt && grep -q "zeroshot" help.txt

step "tiny:clip zero-shot on a small image folder"
"$V/python" - "$WORK/imgs" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
root = Path(sys.argv[1])
for split, n in (("train", 8), ("test", 3)):
    for c, colour in enumerate(("red", "green", "blue")):
        d = root / split / colour
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (40 + i, 36), colour).save(d / f"{i}.jpg")
EOF
"$V/xmodal" zeroshot --backbone tiny:clip --data "imagefolder:$WORK/imgs" --device cpu \
  --cache-dir "$WORK/cache" --json > zeroshot.json
"$V/python" -c "import json,sys; d=json.load(open('zeroshot.json')); print({k: d[k] for k in list(d)[:6]})"

step "xmodal fit + xmodal serve: page, API docs and their assets over HTTP"
"$V/xmodal" fit --backbone tiny:clip --data "$WORK/imgs" --method tip-adapter --shots 4 --augment-views 0 \
  --device cpu --cache-dir "$WORK/cache" --out "$WORK/model" --json > fit.json
"$V/xmodal" serve "$WORK/model" --port 0 --device cpu --log-level warning 2> serve.log &
SERVER_PID=$!
"$V/python" - serve.log "$WORK/imgs/test/red/0.jpg" <<'EOF'
import re, sys, time, urllib.error, urllib.request, uuid
from pathlib import Path
log, image = Path(sys.argv[1]), Path(sys.argv[2])
deadline = time.monotonic() + 120
url = None
while url is None:
    m = re.search(r"listening on (http://127\.0\.0\.1:\d+)/", log.read_text())
    if m:
        url = m.group(1)
    elif time.monotonic() > deadline:
        sys.exit(f"xmodal serve did not start within 120 s:\n{log.read_text()}")
    else:
        time.sleep(0.2)
def get(path):
    for _ in range(100):  # a connection refused or reset while uvicorn starts: retry for up to ~10 s
        try:
            with urllib.request.urlopen(url + path, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            sys.exit(f"GET {path}: HTTP {exc.code}")
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    sys.exit(f"no answer from {url}{path}")
status, page = get("/")
assert status == 200 and b"xmodal few-shot classifier" in page, page[:200]
status, docs = get("/docs")
assert status == 200 and b"swagger-ui" in docs
for asset in re.findall(rb'(/static/swagger-ui/[\w.-]+)', docs):
    status, body = get(asset.decode())
    assert status == 200 and body, asset
boundary = uuid.uuid4().hex
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"0.jpg\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
req = urllib.request.Request(url + "/v1/classify?top_k=2", data=body, method="POST",
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
with urllib.request.urlopen(req, timeout=60) as r:
    answer = r.read().decode()
labels = set(re.findall(r'"label":\s*"(\w+)"', answer))
assert r.status == 200 and labels and labels <= {"red", "green", "blue"}, answer
print(f"page {len(page)} bytes, /docs and its assets served, /v1/classify answered: {answer[:120]}")
EOF
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""

step "without the [serve] extra: xmodal serve names it (exit 4), other commands still work"
"$V/pip" uninstall -q -y fastapi
set +e
"$V/xmodal" serve "$WORK/model" --port 0 2> noextra.log; code=$?
set -e
cat noextra.log
[ "$code" = 4 ] && grep -q "install xmodal\[serve\]" noextra.log && ! grep -q Traceback noextra.log
"$V/xmodal" --help > /dev/null

step "all checks passed (wheel $(basename "$WHEEL"))"
