#!/usr/bin/env bash
# Copies a built libstable_diffusion.so and the libtorch libraries it loads into the package's
# Runtime/Plugins/x86_64/ (Linux x86_64), so that Unity finds them all in one folder.
# (This folder ends in `~`, so Unity never imports this script.)
#
#   Tools~/copy-native.sh [--lib PATH] [--libtorch-lib DIR] [--dest DIR]
#
#   --lib           the library (default: the repository's target/release/libstable_diffusion.so;
#                   `make install` puts the same file in $PREFIX/lib)
#   --libtorch-lib  libtorch's lib/ folder (default: the library's own rpath entry that holds
#                   libtorch_cpu.so, else $LIBTORCH/lib, else the repository's .deps/libtorch/lib)
#   --dest          where to copy (default: Runtime/Plugins/x86_64 of this package)
#
# What it copies: the library, then every library that it needs (its ELF NEEDED entries,
# followed recursively) which lives in libtorch's lib/ folder, under the name it is needed by
# (symlinks followed). For the CPU libtorch that scripts/setup-libtorch.sh assembles that is
# libtorch_cpu.so, libc10.so, libgomp.so.1, libcudart.so.13 and libcupti.so.13 (about 430 MB,
# nearly all libtorch_cpu.so). System libraries (libc, libstdc++, ...) are left to the system.
#
# The build embeds libtorch's absolute lib/ path as the library's run path, which does not exist
# on another machine; the copy's run path is rewritten in place to `$ORIGIN` (the folder of the
# library itself: Plugins/x86_64), so it finds libtorch next to it. libtorch's own libraries
# already look in `$ORIGIN`. The rewrite is done by the Python below, as chrpath does: the new
# path is shorter than the old, so it is written over the old string; nothing else changes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
package="$(dirname "$here")"
repo="$(cd "$package/../.." && pwd)"

lib="$repo/target/release/libstable_diffusion.so"
torch_lib=""
dest="$package/Runtime/Plugins/x86_64"
while [ $# -gt 0 ]; do
  case "$1" in
    --lib) lib="$2"; shift 2 ;;
    --libtorch-lib) torch_lib="$2"; shift 2 ;;
    --dest) dest="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "copy-native.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

[ "$(uname -s)" = Linux ] || { echo "copy-native.sh copies the Linux library; see README.md for Windows and macOS" >&2; exit 1; }
[ -f "$lib" ] || { echo "no library at $lib: build it (make install, or cargo build --release --lib) or pass --lib" >&2; exit 1; }
py="$(command -v python3 || command -v python)" || { echo "python3 is needed" >&2; exit 1; }

# elf.py needed FILE | runpath FILE | set-origin FILE: a 64-bit little-endian ELF's dynamic
# section, read (NEEDED names; RUNPATH or RPATH entries, one per line) or its run path rewritten
# to $ORIGIN in place.
elf() {
  "$py" - "$@" <<'PY'
import struct, sys

cmd, path = sys.argv[1], sys.argv[2]
DT_NULL, DT_NEEDED, DT_STRTAB, DT_RPATH, DT_RUNPATH = 0, 1, 5, 15, 29

with open(path, "rb") as f:
    data = bytearray(f.read())
if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
    sys.exit(f"{path}: not a 64-bit little-endian ELF file")
phoff, = struct.unpack_from("<Q", data, 0x20)
phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
loads, dynamic = [], None
for i in range(phnum):
    p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
    if p_type == 1:
        loads.append((p_vaddr, p_offset, p_filesz))
    elif p_type == 2:
        dynamic = (p_offset, p_filesz)
if dynamic is None:
    sys.exit(f"{path}: no dynamic section")

def file_offset(vaddr):
    for start, offset, size in loads:
        if start <= vaddr < start + size:
            return vaddr - start + offset
    sys.exit(f"{path}: address {vaddr:#x} is in no loaded segment")

entries = []
for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
    tag, val = struct.unpack_from("<qQ", data, off)
    if tag == DT_NULL:
        break
    entries.append((tag, val))
strtab = file_offset(next(v for t, v in entries if t == DT_STRTAB))

def string_at(index):
    start = strtab + index
    return bytes(data[start:data.index(0, start)])

paths = [(t, v) for t, v in entries if t in (DT_RPATH, DT_RUNPATH)]
if cmd == "needed":
    for t, v in entries:
        if t == DT_NEEDED:
            print(string_at(v).decode())
elif cmd == "runpath":
    for _, v in paths:
        for entry in string_at(v).decode().split(":"):
            print(entry)
elif cmd == "set-origin":
    if not paths:
        sys.exit(f"{path}: no run path to rewrite")
    new = b"$ORIGIN"
    for _, v in paths:
        old = string_at(v)
        if old == new:
            continue
        if len(new) > len(old):
            sys.exit(f"{path}: run path {old!r} is shorter than $ORIGIN")
        # Other names in the string table may share the old string's tail (the linker merges
        # suffixes): they start past the new string's NUL and are left as they were.
        data[strtab + v:strtab + v + len(new) + 1] = new + b"\0"
    with open(path, "r+b") as f:
        f.write(data)
else:
    sys.exit(f"unknown command {cmd}")
PY
}

if [ -z "$torch_lib" ]; then
  runpath="$(elf runpath "$lib")"
  for entry in $runpath; do
    if [ -f "$entry/libtorch_cpu.so" ]; then torch_lib="$entry"; break; fi
  done
fi
if [ -z "$torch_lib" ] && [ -n "${LIBTORCH:-}" ] && [ -f "$LIBTORCH/lib/libtorch_cpu.so" ]; then
  torch_lib="$LIBTORCH/lib"
fi
if [ -z "$torch_lib" ] && [ -f "$repo/.deps/libtorch/lib/libtorch_cpu.so" ]; then
  torch_lib="$repo/.deps/libtorch/lib"
fi
[ -n "$torch_lib" ] && [ -d "$torch_lib" ] || {
  echo "libtorch's lib/ folder not found (not in the library's run path, \$LIBTORCH or .deps/libtorch): pass --libtorch-lib" >&2
  exit 1
}

mkdir -p "$dest"
echo "copying $lib"
echo "   and its libtorch libraries from $torch_lib"
echo "   into $dest"
install -m 755 "$lib" "$dest/libstable_diffusion.so"
elf set-origin "$dest/libstable_diffusion.so"

# The libraries it needs, breadth first; those not in libtorch's folder come from the system.
queue=("$dest/libstable_diffusion.so")
declare -A seen=()
system=()
while [ ${#queue[@]} -gt 0 ]; do
  current="${queue[0]}"
  queue=("${queue[@]:1}")
  needed="$(elf needed "$current")"
  for name in $needed; do
    [ -z "${seen[$name]:-}" ] || continue
    seen[$name]=1
    if [ -e "$torch_lib/$name" ]; then
      cp -L "$torch_lib/$name" "$dest/$name"
      chmod 755 "$dest/$name"
      echo "  $name ($(du -h "$dest/$name" | cut -f1))"
      queue+=("$dest/$name")
    else
      system+=("$name")
    fi
  done
done
echo "from the system: ${system[*]}"
echo "libstable_diffusion.so's run path is now: $(elf runpath "$dest/libstable_diffusion.so")"
