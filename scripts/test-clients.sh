#!/usr/bin/env bash
# Builds and runs the clients of the C ABI against the shipped model (models/tiny), through an install
# (`make install PROFILE=debug` into a scratch prefix, linked with pkg-config as the README
# shows): the C example, the same under valgrind (no definite leak, no memory error), the C
# fuzzer of the ABI's promises (3000 seeded cases, and 300 cheap ones under valgrind), a C
# program compiled against the header before the SDXL fields (tests/abi/), the C++
# RAII wrapper's example, the C# binding's example (Mono), the Unity package (its manifest and
# assembly definitions, Tools~/copy-native.sh and the C# example run against the Plugins folder
# it fills; its sample compiled against a compile-check stand-in of UnityEngine) and the Python
# ctypes example. Each example checks its own results and exits non-zero on a surprise.
# Prints `clients: N passed, M failed` last; exits non-zero when any failed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="$root/target/clients"
prefix="$work/prefix"
model="$root/models/tiny"
# A LoRA and the model it was made for: the clients show a per-call LoRA with them.
lora_args=("$root/tests/fixtures/tiny-sd1" "$root/tests/fixtures/lora/sd1-kohya.safetensors")
# The Unity package, home of the C# binding (Runtime/StableDiffusion.cs).
unity_pkg="$root/unity/com.stablediffusion.runtime"
rm -rf "$work"
mkdir -p "$work"

passed=0
failed=0
failures=()

# run NAME COMMAND...: runs a client, logs to $work/NAME.log, counts the outcome.
run() {
  local name="$1"
  shift
  local start=$SECONDS
  if "$@" >"$work/$name.log" 2>&1; then
    passed=$((passed + 1))
    echo "client $name: ok ($((SECONDS - start)) s)"
    grep -h '^abi_fuzz:' "$work/$name.log" | sed 's/^/    /'
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "client $name: FAILED ($((SECONDS - start)) s); its output:"
    tail -n 40 "$work/$name.log" | sed 's/^/    /'
  fi
}

need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "$1 is missing (scripts/setup-test-tools.sh installs it)"
    return 1
  }
}

echo "building and installing the library into $prefix"
if ! make --no-print-directory install PREFIX="$prefix" PROFILE=debug >"$work/install.log" 2>&1; then
  tail -n 40 "$work/install.log"
  echo "clients: 0 passed, 10 failed"
  exit 1
fi
export PKG_CONFIG_PATH="$prefix/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
read -r -a sd_flags <<<"$(pkg-config --cflags --libs stable_diffusion)"

c_client() {
  cc -std=c99 -Wall -Wextra -Wpedantic -Werror examples/c/txt2img.c "${sd_flags[@]}" \
    -o "$work/c_txt2img" &&
    "$work/c_txt2img" "$model" "$work/c.ppm" "a red circle" 4 &&
    test -s "$work/c.ppm"
}

# Two steps, one OpenMP thread: libtorch under valgrind is slow. Judged on its summary:
# "definitely lost: 0 bytes" and no memory error. No suppression file is used.
valgrind_client() {
  need valgrind && test -x "$work/c_txt2img" || return 1
  OMP_NUM_THREADS=1 valgrind --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite --error-exitcode=99 --log-file="$work/valgrind.txt" \
    "$work/c_txt2img" "$model" "$work/c-valgrind.ppm" "a red circle" 2
  local rc=$?
  grep -E "definitely lost|ERROR SUMMARY" "$work/valgrind.txt"
  [ $rc -eq 0 ] || return 1
  grep -q "definitely lost: 0 bytes" "$work/valgrind.txt" ||
    grep -q "no leaks are possible" "$work/valgrind.txt"
}

# The fuzzer of the ABI's promises (examples/c/abi_fuzz.c): a few thousand seeded cases. One
# OpenMP thread: its tiny runs alternate between the caller's thread and job workers, and
# on a loaded machine the idle OpenMP teams' spinning made it 10 to 50 times slower.
fuzz_client() {
  cc -std=c99 -Wall -Wextra -Wpedantic -Werror examples/c/abi_fuzz.c "${sd_flags[@]}" \
    -o "$work/c_abi_fuzz" &&
    OMP_NUM_THREADS=1 "$work/c_abi_fuzz" "$model" 3000
}

# Its cheap cases under valgrind: validation failures and one real one-step job (libtorch
# under valgrind is slow), judged as the example is.
fuzz_valgrind_client() {
  need valgrind && test -x "$work/c_abi_fuzz" || return 1
  OMP_NUM_THREADS=1 valgrind --leak-check=full --errors-for-leak-kinds=definite \
    --show-leak-kinds=definite --error-exitcode=99 --log-file="$work/fuzz-valgrind.txt" \
    "$work/c_abi_fuzz" "$model" 300 --light
  local rc=$?
  grep -E "definitely lost|ERROR SUMMARY" "$work/fuzz-valgrind.txt"
  [ $rc -eq 0 ] || return 1
  grep -q "definitely lost: 0 bytes" "$work/fuzz-valgrind.txt" ||
    grep -q "no leaks are possible" "$work/fuzz-valgrind.txt"
}

# A program compiled against the header before the SDXL fields (tests/abi/before-sdxl/): it
# must produce the bytes the same source gives against the current header, with a smaller
# sd_generate_params.
old_header_client() {
  local flags=(-std=c99 -Wall -Wextra -Wpedantic -Werror tests/abi/old_client.c)
  cc "${flags[@]}" -Itests/abi/before-sdxl "${sd_flags[@]}" -o "$work/old_client_old" &&
    cc "${flags[@]}" "${sd_flags[@]}" -o "$work/old_client_new" &&
    local old_size new_size &&
    old_size=$("$work/old_client_old" "$model" "$work/old.rgb" | awk '{print $2}') &&
    new_size=$("$work/old_client_new" "$model" "$work/new.rgb" | awk '{print $2}') &&
    echo "sizeof(sd_generate_params): before SDXL $old_size, now $new_size" &&
    [ "$old_size" -lt "$new_size" ] && test -s "$work/old.rgb" && cmp "$work/old.rgb" "$work/new.rgb"
}

cpp_client() {
  c++ -std=c++17 -Wall -Wextra -Wpedantic -Werror examples/cpp/txt2img.cpp "${sd_flags[@]}" \
    -pthread -o "$work/cpp_txt2img" &&
    "$work/cpp_txt2img" "$model" "$work/cpp.ppm" "${lora_args[@]}"
}

csharp_client() {
  need mcs && need mono || return 1
  mcs -warnaserror -out:"$work/csharp_example.exe" \
    "$unity_pkg/Runtime/StableDiffusion.cs" examples/csharp/Example.cs &&
    LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
      mono "$work/csharp_example.exe" "$model" "$work/csharp.ppm" "${lora_args[@]}"
}

# The Unity package without Unity (none can be installed here; nothing runs in an editor or a
# player): package.json and every .asmdef are valid JSON with the expected names and version;
# Tools~/copy-native.sh fills a Plugins/x86_64 folder from the installed library, whose libtorch
# libraries then all resolve inside that folder (no LD_LIBRARY_PATH; the copy's run path is
# $ORIGIN); the C# example (built by the csharp client) runs against that folder alone; and
# git ignores copied binaries in the package.
unity_package_client() {
  need python3 && need mono && test -f "$work/csharp_example.exe" || return 1
  local plugins="$work/unity/Plugins/x86_64" version lib
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
  python3 -m json.tool "$unity_pkg/package.json" >/dev/null &&
    python3 - "$unity_pkg" "$version" <<'PY' &&
import glob, json, os, sys
pkg, version = sys.argv[1], sys.argv[2]
manifest = json.load(open(os.path.join(pkg, "package.json")))
assert manifest["name"] == "com.stablediffusion.runtime", manifest["name"]
assert manifest["version"] == version, f"package.json {manifest['version']} != Cargo.toml {version}"
assert manifest["unity"] == "2021.3", manifest["unity"]
for sample in manifest["samples"]:
    assert os.path.isdir(os.path.join(pkg, sample["path"])), sample["path"]
expected = {
    "Runtime/StableDiffusion.Runtime.asmdef": "StableDiffusion.Runtime",
    "Samples~/Texture Generator/StableDiffusion.Samples.TextureGenerator.asmdef":
        "StableDiffusion.Samples.TextureGenerator",
}
found = sorted(os.path.relpath(p, pkg) for p in glob.glob(os.path.join(pkg, "**", "*.asmdef"), recursive=True))
assert found == sorted(expected), f"asmdefs: {found}"
for path, name in expected.items():
    asmdef = json.load(open(os.path.join(pkg, path)))
    assert asmdef["name"] == name, f"{path}: {asmdef['name']}"
    print(f"{path}: {name}")
sample = json.load(open(os.path.join(pkg, "Samples~/Texture Generator/StableDiffusion.Samples.TextureGenerator.asmdef")))
assert sample["references"] == ["StableDiffusion.Runtime"], sample["references"]
print(f"package.json: {manifest['name']} {manifest['version']}")
PY
    bash "$unity_pkg/Tools~/copy-native.sh" --lib "$prefix/lib/libstable_diffusion.so" --dest "$plugins" &&
    env -u LD_LIBRARY_PATH ldd "$plugins/libstable_diffusion.so" >"$work/unity-ldd.txt" &&
    cat "$work/unity-ldd.txt" &&
    ! grep -q "not found" "$work/unity-ldd.txt" &&
    for lib in libtorch_cpu.so libc10.so libgomp.so.1; do
      grep -q "^[[:space:]]*$lib => $plugins/$lib " "$work/unity-ldd.txt" ||
        { echo "$lib does not resolve inside $plugins"; return 1; }
    done &&
    LD_LIBRARY_PATH="$plugins" mono "$work/csharp_example.exe" "$model" "$work/unity.ppm" &&
    if git rev-parse --git-dir >/dev/null 2>&1; then
      for lib in "$plugins"/*; do
        git check-ignore -q "$unity_pkg/Runtime/Plugins/x86_64/${lib##*/}" ||
          { echo "git does not ignore Runtime/Plugins/x86_64/${lib##*/}"; return 1; }
      done
      echo "git ignores the copied libraries in Runtime/Plugins/x86_64"
    fi
}

# A compile check, not a Unity test: scripts/unity-compile-check/ declares the few UnityEngine
# types the package uses (bodies throw; never shipped). mcs compiles the runtime with Unity's
# UNITY_5_3_OR_NEWER define (it then uses UnityEngine's AOT.MonoPInvokeCallbackAttribute) and the
# Texture Generator sample against it and the runtime, warnings as errors.
unity_sample_client() {
  need mcs || return 1
  local out="$work/unity-compile-check"
  mkdir -p "$out" &&
    mcs -target:library -warnaserror -out:"$out/UnityEngine.dll" \
      scripts/unity-compile-check/UnityEngineCompileCheck.cs &&
    mcs -target:library -warnaserror -define:UNITY_5_3_OR_NEWER -r:"$out/UnityEngine.dll" \
      -out:"$out/StableDiffusion.Runtime.dll" "$unity_pkg"/Runtime/*.cs &&
    mcs -target:library -warnaserror -r:"$out/UnityEngine.dll" -r:"$out/StableDiffusion.Runtime.dll" \
      -out:"$out/StableDiffusion.Samples.TextureGenerator.dll" "$unity_pkg/Samples~/Texture Generator"/*.cs &&
    echo "compiled the runtime and the Texture Generator sample against the stand-in"
}

python_client() {
  need python3 || return 1
  python3 examples/python/txt2img.py --lib "$prefix/lib/libstable_diffusion.so" \
    "$model" "$work/python.ppm" "${lora_args[@]}"
}

run c c_client
run c-old-header old_header_client
run c-valgrind valgrind_client
run c-fuzz fuzz_client
run c-fuzz-valgrind fuzz_valgrind_client
run cpp cpp_client
run csharp csharp_client
run unity-package unity_package_client
run unity-sample unity_sample_client
run python python_client

[ $failed -eq 0 ] || echo "failed clients: ${failures[*]} (logs in $work)"
echo "clients: $passed passed, $failed failed"
[ $failed -eq 0 ]
