#!/usr/bin/env bash
# Installs what the C ABI client tests need beyond Rust and a C/C++ compiler: Mono's C#
# compiler and runtime (mcs, mono), valgrind and pkg-config, from Debian's packages, when they
# are missing.
# Idempotent: returns at once when every tool is already there. Needs root (or sudo) and apt-get
# to install anything; elsewhere it says what is missing and leaves the client script to skip.
set -euo pipefail

missing=()
command -v mcs >/dev/null 2>&1 || missing+=(mono-mcs)
command -v mono >/dev/null 2>&1 || missing+=(mono-runtime)
# mcs needs the class libraries the examples use (System, System.Core).
[ -e /usr/lib/mono/4.5/System.Core.dll ] || missing+=(libmono-system-core4.0-cil)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup-test-tools: apt-get not found; install ${missing[*]} by hand" >&2
  exit 0
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
    echo "setup-test-tools: not root; install ${missing[*]} by hand" >&2
    exit 0
  fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup-test-tools: installing ${missing[*]}"
# Refresh the package lists only when apt does not know a package yet (fresh images ship none).
for pkg in "${missing[@]}"; do
  if ! apt-cache show "$pkg" >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq
    break
  fi
done
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
