#!/usr/bin/env bash
# Regenerate the test fixtures under tests/fixtures/ (see tools/README.md).
# Developer-only: nothing here is needed to build or run the library.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv-fixtures"
PY="$VENV/bin/python"
PINNED=(
  "torch==2.13.0"
  "diffusers==0.42.1"
  "transformers==5.24.0"
  "safetensors==0.8.0"
  "ftfy"
  "open_clip_torch==3.3.0"
  "scipy==1.17.1"
  "peft==0.21.2"
)

if [[ ! -x "$PY" ]]; then
  echo "== creating $VENV (python3 -m venv) and installing: ${PINNED[*]}"
  python3 -m venv "$VENV"
  "$PY" -m pip install --upgrade pip
  "$PY" -m pip install "${PINNED[@]}"
else
  echo "== using existing $VENV"
fi

"$PY" - <<'PYEOF'
import importlib.metadata as md
for pkg, want in (("torch", "2.13.0"), ("diffusers", "0.42.1"), ("transformers", "5.24.0"),
                  ("safetensors", "0.8.0")):
    try:
        have = md.version(pkg)
    except md.PackageNotFoundError:
        have = "missing"
    mark = "ok" if have.split("+")[0] == want else "MISMATCH (references may differ)"
    print(f"   {pkg:13s} {have:20s} pinned {want:8s} {mark}")
PYEOF

status=0
for script in tokenizer schedulers schedulers_k schedulers_multistep models sdxl single_file single_file_sdxl a1111_prompts lora embeddings engine; do
  path="tools/fixtures/$script.py"
  if [[ ! -f "$path" ]]; then
    echo "== skipping $path (not written yet)"
    continue
  fi
  echo "== running $path"
  if ! "$PY" "$path"; then
    echo "!! $path failed" >&2
    status=1
  fi
done
"$PY" tools/export_torchscript.py tests/fixtures/tiny-sd2 tests/fixtures/torchscript/tiny-sd2 || { echo "!! tools/export_torchscript.py failed" >&2; status=1; }

echo "== fixture files"
if [[ -d tests/fixtures ]]; then
  du -sh tests/fixtures
fi
exit "$status"
