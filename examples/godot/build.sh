#!/usr/bin/env bash
# Builds the GDNative library of the Godot 3 plugin (src/sd_godot.c) against
# libstable_diffusion and Godot 3.2's GDNative headers.
#
#     SD_LIB=target/release/libstable_diffusion.so bash examples/godot/build.sh [OUTPUT.so]
#
# SD_LIB      the built libstable_diffusion.so to link (default: target/release/ of this repo;
#             `cargo build --lib --release` or `make install` makes it)
# SD_INCLUDE  the folder of stable_diffusion.h (default: include/ of this repo)
# OUTPUT.so   default: examples/godot/project/stable_diffusion/bin/linux/libsd_godot.so, where
#             stable_diffusion.gdnlib looks for it
#
# The GDNative headers (godot_headers of the Godot 3.2 branch: gdnative_api_struct.gen.h,
# gdnative/, nativescript/) come from the crates.io package gdnative-sys 0.9.3, which bundles
# them; they are downloaded once into .deps/godot-headers/ (git-ignored), checked against the
# sha256 pinned below, and reused afterwards. They are identical to the headers and
# gdnative_api.json of Godot 3.2.3's source. GODOT_HEADERS=DIR uses another copy instead.
#
# The library is linked with the rpath $ORIGIN (a libstable_diffusion.so next to it wins) and
# the folder of SD_LIB; libstable_diffusion.so finds libtorch through its own rpath.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$here/project/stable_diffusion/bin/linux/libsd_godot.so}"
sd_lib="${SD_LIB:-$root/target/release/libstable_diffusion.so}"
sd_include="${SD_INCLUDE:-$root/include}"

crate_version=0.9.3
crate_sha256=97911fe633877345ce7788cf19febb322dc7a7ffd585098fea7e5cef11edf7f2

fetch_headers() {
  local dest="$root/.deps/godot-headers/gdnative-sys-$crate_version"
  if [ -f "$dest/.complete" ] && [ "$(cat "$dest/.complete")" = "$crate_sha256" ]; then
    echo "$dest"
    return
  fi
  local tmp
  tmp="$(mktemp -d)"
  # crates.io's download API redirects to static.crates.io; ask the latter first.
  local urls=("https://static.crates.io/crates/gdnative-sys/gdnative-sys-$crate_version.crate"
    "https://crates.io/api/v1/crates/gdnative-sys/$crate_version/download")
  local ok=0 url
  for url in "${urls[@]}"; do
    echo "godot headers: downloading $url" >&2
    if curl -sSfL --retry 2 -o "$tmp/crate.tar.gz" "$url"; then ok=1 && break; fi
  done
  if [ $ok = 0 ]; then
    rm -rf "$tmp"
    echo "godot headers: download failed" >&2
    return 1
  fi
  if ! echo "$crate_sha256  $tmp/crate.tar.gz" | sha256sum -c --quiet - >&2; then
    rm -rf "$tmp"
    echo "godot headers: sha256 mismatch for gdnative-sys $crate_version" >&2
    return 1
  fi
  tar xzf "$tmp/crate.tar.gz" -C "$tmp" "gdnative-sys-$crate_version/godot_headers"
  rm -rf "$dest"
  mkdir -p "$(dirname "$dest")"
  mv "$tmp/gdnative-sys-$crate_version/godot_headers" "$dest"
  echo "$crate_sha256" >"$dest/.complete"
  rm -rf "$tmp"
  echo "godot headers: gdnative-sys $crate_version (sha256 $crate_sha256) in $dest" >&2
  echo "$dest"
}

if [ ! -f "$sd_lib" ]; then
  echo "build: $sd_lib not found; build it first (cargo build --lib --release) or set SD_LIB" >&2
  exit 1
fi
case "$(basename "$sd_lib")" in
libstable_diffusion.so) ;;
*)
  echo "build: SD_LIB must name a file called libstable_diffusion.so, got $sd_lib" >&2
  exit 1
  ;;
esac
headers="${GODOT_HEADERS:-$(fetch_headers)}"
test -f "$headers/gdnative_api_struct.gen.h" || {
  echo "build: no gdnative_api_struct.gen.h in $headers" >&2
  exit 1
}

lib_dir="$(cd "$(dirname "$sd_lib")" && pwd)"
mkdir -p "$(dirname "$out")"
# The Godot headers are system headers here: their own warnings are not ours.
${CC:-cc} -std=c11 -O2 -g -fPIC -shared -fvisibility=hidden -D_POSIX_C_SOURCE=200809L \
  -Wall -Wextra -Wpedantic -Wshadow -Werror \
  -isystem "$headers" -I "$sd_include" \
  "$here/src/sd_godot.c" \
  -L "$lib_dir" -lstable_diffusion -Wl,-rpath,'$ORIGIN' -Wl,-rpath,"$lib_dir" -pthread \
  -Wl,--no-undefined -o "$out"
echo "build: wrote $out (linked to $lib_dir/libstable_diffusion.so)" >&2
