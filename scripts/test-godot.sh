#!/usr/bin/env bash
# The Godot 3 plugin's headless test (examples/godot/): installs Debian's godot3-server when it
# is missing, builds the plugin's GDNative library against the built libstable_diffusion.so,
# and runs examples/godot/project/tests/test_generate.gd in the headless server on the shipped
# model (models/tiny): an asynchronous generation polled every frame (progress, previews, log,
# a PNG written and read back), image to image with a mask, a cancelled run, the refusals
# (bad model path, bad options and parameters), the demo scene, and no handle left behind.
#
#     SD_LIB=target/release/libstable_diffusion.so bash scripts/test-godot.sh
#
# SD_LIB      the libstable_diffusion.so to test (default target/release/; `make godot` builds
#             it first, as `make clients` does for the other clients). It finds libtorch through
#             the rpath it was built with, so .deps/libtorch (or LIBTORCH) must be where it was.
# SD_MODEL    the model (default models/tiny)
# GODOT       the Godot 3 headless binary (default godot3-server)
# GODOT_TIMEOUT  seconds before the Godot run is killed (default 170)
#
# Works in target/godot/ (a copy of the project with the library built into it, the PNGs, the
# log). Prints `godot: N passed, M failed` last; exits non-zero when anything failed, when
# Godot reported a script error or leaked objects at exit, or when no summary was printed
# (Godot exits 0 on a parse error).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="$root/target/godot"
sd_lib="${SD_LIB:-$root/target/release/libstable_diffusion.so}"
model="${SD_MODEL:-$root/models/tiny}"
godot="${GODOT:-godot3-server}"
timeout_s="${GODOT_TIMEOUT:-170}"

fail() {
  echo "godot-test: $*"
  echo "godot: 0 passed, 1 failed"
  exit 1
}

case "$sd_lib" in /*) ;; *) sd_lib="$root/$sd_lib" ;; esac
case "$model" in /*) ;; *) model="$root/$model" ;; esac
[ -f "$sd_lib" ] || fail "no library at $sd_lib: build it first (make godot does), or set SD_LIB"
[ -f "$model/model_index.json" ] || fail "no model at $model"

# Debian's headless Godot 3 (godot3-server, 3.2.3 on bookworm), when missing.
if ! command -v "$godot" >/dev/null 2>&1; then
  [ "$godot" = godot3-server ] || fail "$godot not found"
  command -v apt-get >/dev/null 2>&1 || fail "godot3-server is missing and there is no apt-get to install it"
  sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "godot3-server is missing; not root: install it by hand"
    sudo=(sudo)
  fi
  echo "godot-test: installing godot3-server from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  # Refresh the package lists only when apt does not know the package yet.
  apt-cache show godot3-server >/dev/null 2>&1 || "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends godot3-server >/dev/null ||
    fail "apt-get install godot3-server failed"
fi
echo "godot-test: $("$godot" --version 2>/dev/null | tail -n 1) ($(command -v "$godot"))"

rm -rf "$work"
mkdir -p "$work/out" "$work/home/data" "$work/home/config" "$work/home/cache"
cp -r examples/godot/project "$work/project"
rm -rf "$work/project/stable_diffusion/bin" "$work/project/.import"
# The copy's settings override: no log file in user:// (Godot's output is kept in godot.log).
printf '[logging]\n\nfile_logging/enable_file_logging=false\nfile_logging/enable_file_logging.pc=false\n' >"$work/project/override.cfg"

echo "godot-test: building the GDNative library against $sd_lib"
if ! SD_LIB="$sd_lib" bash examples/godot/build.sh \
  "$work/project/stable_diffusion/bin/linux/libsd_godot.so" >"$work/build.log" 2>&1; then
  cat "$work/build.log"
  fail "building the GDNative library failed"
fi
sed 's/^/    /' "$work/build.log"

echo "godot-test: running res://tests/test_generate.gd headless (timeout ${timeout_s} s)"
start=$SECONDS
# Godot's user:// data and logs go to the work folder, not to $HOME; a UTF-8 locale keeps it
# from complaining about "C".
XDG_DATA_HOME="$work/home/data" XDG_CONFIG_HOME="$work/home/config" \
  XDG_CACHE_HOME="$work/home/cache" LANG=en_US.UTF-8 LC_ALL= \
  SD_MODEL="$model" SD_GODOT_OUT="$work/out" \
  timeout -k 10 "$timeout_s" "$godot" --path "$work/project" -s res://tests/test_generate.gd \
  >"$work/godot.log" 2>&1
rc=$?
elapsed=$((SECONDS - start))
grep -v '^godot: [0-9]* passed, [0-9]* failed$' "$work/godot.log" | sed 's/^/    /'

summary="$(grep -E '^godot: [0-9]+ passed, [0-9]+ failed$' "$work/godot.log" | tail -n 1)"
passed="$(echo "$summary" | sed -n 's/^godot: \([0-9]*\) passed.*/\1/p')"
failed="$(echo "$summary" | sed -n 's/.* \([0-9]*\) failed$/\1/p')"
problems=()
# Exit code 1 with failures counted in the summary is those failures; anything else is one more.
if [ $rc -ne 0 ] && ! { [ $rc -eq 1 ] && [ "${failed:-0}" -gt 0 ]; }; then
  problems+=("Godot exited with $rc$([ $rc -eq 124 ] && echo ' (timeout)')")
fi
[ -n "$summary" ] || problems+=("the test printed no summary")
grep -q 'SCRIPT ERROR' "$work/godot.log" && problems+=("Godot reported a script error")
grep -qE 'leaked at exit|still in use at exit' "$work/godot.log" &&
  problems+=("Godot reported objects or resources leaked at exit")
for png in godot_txt2img.png godot_inpaint.png; do
  [ -s "$work/out/$png" ] || problems+=("no $png written")
done

echo "godot-test: the Godot run took ${elapsed} s; images in $work/out, log in $work/godot.log"
for p in "${problems[@]}"; do echo "godot-test: FAILED: $p"; done
failed=$((${failed:-0} + ${#problems[@]}))
echo "godot: ${passed:-0} passed, $failed failed"
[ $failed -eq 0 ]
