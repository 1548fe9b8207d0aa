#!/usr/bin/env bash
# Builds and runs the clients of the C ABI against the shipped model (models/tiny), through an install
# (`make install PROFILE=debug` into a scratch prefix, linked with pkg-config as the README
# shows): the C example, the same under valgrind (no definite leak, no memory error), the C
# fuzzer of the ABI's promises (3000 seeded cases, and 300 cheap ones under valgrind), a C
# program compiled against the header before the SDXL fields (tests/abi/), the C++
# RAII wrapper's example, the C# binding's example (Mono) and the Python ctypes example.
# Each example checks its own results and exits non-zero on a surprise.
# Prints `clients: N passed, M failed` last; exits non-zero when any failed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="$root/target/clients"
prefix="$work/prefix"
model="$root/models/tiny"
# A LoRA and the model it was made for: the clients show a per-call LoRA with them.
lora_args=("$root/tests/fixtures/tiny-sd1" "$root/tests/fixtures/lora/sd1-kohya.safetensors")
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
  echo "clients: 0 passed, 8 failed"
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
    examples/csharp/StableDiffusion.cs examples/csharp/Example.cs &&
    LD_LIBRARY_PATH="$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
      mono "$work/csharp_example.exe" "$model" "$work/csharp.ppm" "${lora_args[@]}"
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
run python python_client

[ $failed -eq 0 ] || echo "failed clients: ${failures[*]} (logs in $work)"
echo "clients: $passed passed, $failed failed"
[ $failed -eq 0 ]
