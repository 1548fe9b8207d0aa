#!/usr/bin/env bash
# Assembles a CPU-only libtorch 2.13.0 (the version tch 0.26 is built against) from PyPI wheels
# into .deps/libtorch, unless LIBTORCH already points at a libtorch of the user's own.
# Idempotent: returns at once when the folder is complete.
set -euo pipefail

TORCH_VERSION=2.13.0
CUDART_VERSION=13.0.96
CUPTI_VERSION=13.0.85

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/.deps/libtorch}"

if [ -n "${LIBTORCH:-}" ] && [ "$LIBTORCH" != "$dest" ]; then
  [ -d "$LIBTORCH/lib" ] || { echo "LIBTORCH=$LIBTORCH has no lib/ folder" >&2; exit 1; }
  echo "using LIBTORCH=$LIBTORCH"
  exit 0
fi

stamp="$dest/.complete-$TORCH_VERSION"
if [ -f "$stamp" ]; then
  exit 0
fi

py="$(command -v python3 || command -v python)" || { echo "python3 is needed to fetch libtorch" >&2; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "fetching libtorch $TORCH_VERSION (CPU part of the PyPI wheel) into $dest"
"$py" -m pip download --quiet --no-deps --only-binary=:all: \
  -d "$work" \
  "torch==$TORCH_VERSION" "nvidia-cuda-runtime==$CUDART_VERSION" "nvidia-cuda-cupti==$CUPTI_VERSION"

rm -rf "$dest"
mkdir -p "$dest/lib"
"$py" - "$work" "$dest" <<'PY'
import glob, os, shutil, sys, zipfile
work, dest = sys.argv[1], sys.argv[2]
wanted_libs = {"libc10.so", "libtorch_cpu.so", "libgomp.so.1"}
torch_whl = glob.glob(os.path.join(work, "torch-*.whl"))[0]
with zipfile.ZipFile(torch_whl) as z:
    for name in z.namelist():
        if name.endswith("/"):
            continue
        parts = name.split("/")
        if parts[0] != "torch":
            continue
        if parts[1] in ("include", "share") or (parts[1] == "lib" and len(parts) == 3 and parts[2] in wanted_libs):
            target = os.path.join(dest, *parts[1:])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    version = z.read("torch/version.py").decode()
    for line in version.splitlines():
        if line.startswith("__version__"):
            v = line.split("=")[1].strip().strip("'\"")
            open(os.path.join(dest, "build-version"), "w").write(v + "\n")
for pattern, lib in (("nvidia_cuda_runtime-*.whl", "libcudart.so.13"), ("nvidia_cuda_cupti-*.whl", "libcupti.so.13")):
    whl = glob.glob(os.path.join(work, pattern))[0]
    with zipfile.ZipFile(whl) as z:
        member = next(n for n in z.namelist() if n.endswith("/" + lib))
        with z.open(member) as src, open(os.path.join(dest, "lib", lib), "wb") as out:
            shutil.copyfileobj(src, out)
PY

# torch-sys always links -ltorch; the real libtorch.so needs libtorch_cuda, so an empty stub
# stands in for it (every symbol we use lives in libtorch_cpu/libc10).
cc=$(command -v cc || command -v gcc) || { echo "a C compiler is needed for the libtorch stub" >&2; exit 1; }
echo "" | "$cc" -shared -fPIC -x c -o "$dest/lib/libtorch.so" -
touch "$stamp"
echo "libtorch ready in $dest"
