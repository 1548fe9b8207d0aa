# The two commands of the README: `make demo` and `make test`. Both set up libtorch first.
LIBTORCH ?= $(CURDIR)/.deps/libtorch
export LIBTORCH

PROMPT ?= a red circle on a white background
MODEL ?= models/tiny
OUT ?= out/demo.png

.PHONY: setup build demo test fixtures clean-deps test-tools clients godot header install bench bench-fast bench-engine

# `make install`: where, and which cargo profile's library (release, or debug for the tests).
PREFIX ?= /usr/local
PROFILE ?= release
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

setup:
	@bash scripts/setup-libtorch.sh "$(CURDIR)/.deps/libtorch"

build: setup
	cargo build --bins

demo: build
	@mkdir -p $(dir $(OUT))
	cargo run --quiet --bin sd -- txt2img --model "$(MODEL)" --prompt "$(PROMPT)" --steps 20 --guidance 5 --seed 42 --out "$(OUT)"

# cargo test, then the C ABI's clients (run even when cargo test failed; either fails the target).
# The loaders' fuzz test runs on its own with its output shown: it prints how many cases ran.
test: setup test-tools
	@status=0; cargo test --no-fail-fast -- --skip fuzz_loaders || status=1; \
	cargo test --test fuzz_loaders -- --nocapture || status=1; \
	bash scripts/test-clients.sh || status=1; \
	{ cargo build --lib && SD_LIB=target/debug/libstable_diffusion.so bash scripts/test-godot.sh; } || status=1; \
	exit $$status

# Ours against diffusers on the product path, cold processes, alternating rounds (examples/bench.rs).
# Needs the venv of tools/make_fixtures.sh; e.g. BENCH_ARGS="--sizes 256 --steps 8".
bench: setup
	cargo run --release --example bench -- $(BENCH_ARGS)

# Each opt-in fast mode's speed-up and quality cost (examples/bench_fast.rs): on models/tiny with
# its adherence, then on the SD 1.5-size random folder that `make bench` writes, when it exists.
BENCH_DIR ?= $(HOME)/.cache/stable-diffusion-bench/sd15-random
bench-fast: setup
	cargo run --release --example bench_fast -- --model models/tiny --prompt-set shapes \
		--prompts 24 --guidance 5 --eval-images 108 $(BENCH_FAST_ARGS)
	@if [ -f "$(BENCH_DIR)/model_index.json" ]; then \
		cargo run --release --example bench_fast -- --model "$(BENCH_DIR)" --size 512 \
			--steps 10 --prompts 2 --modes cache:3,cache:3:2,tome:0.5,int8 $(BENCH_FAST_ARGS); \
	else echo "no SD 1.5-size folder in $(BENCH_DIR): run make bench once to write it"; fi

# What the engine features cost (examples/bench_engine.rs), on the SD 1.5-size folder `make bench`
# writes: previews every step, the tiny autoencoder's decode against the VAE's, a large decode
# tiled and untiled (fresh processes, peak RSS).
bench-engine: setup
	cargo run --release --example bench_engine -- --model "$(BENCH_DIR)" $(BENCH_ENGINE_ARGS)

# Mono (C# client) and valgrind, from Debian's packages when missing.
test-tools:
	@bash scripts/setup-test-tools.sh

# The C, C++, C# and Python clients of the C ABI, and the C one under valgrind.
clients: setup test-tools
	bash scripts/test-clients.sh

# The Godot 3 plugin (examples/godot/): its GDNative library built against this build's library,
# and its headless test in Debian's godot3-server (installed when missing).
godot: setup
	cargo build --lib
	SD_LIB=target/debug/libstable_diffusion.so bash scripts/test-godot.sh

# Rewrites include/stable_diffusion.h from src/ffi/ (tests/ffi_header.rs checks it is current).
header: setup
	SD_UPDATE_HEADER=1 cargo build --lib

# The shared library, the C and C++ headers and a pkg-config file under $(PREFIX).
install: setup
	cargo build --lib $(if $(filter release,$(PROFILE)),--release,)
	install -d "$(DESTDIR)$(PREFIX)/lib/pkgconfig" "$(DESTDIR)$(PREFIX)/include"
	install -m 755 target/$(PROFILE)/libstable_diffusion.so "$(DESTDIR)$(PREFIX)/lib/"
	install -m 644 include/stable_diffusion.h include/stable_diffusion.hpp "$(DESTDIR)$(PREFIX)/include/"
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' scripts/stable_diffusion.pc.in \
		> "$(DESTDIR)$(PREFIX)/lib/pkgconfig/stable_diffusion.pc"

# Regenerates tests/fixtures with diffusers/transformers (creates .venv-fixtures; needs PyPI).
fixtures:
	bash tools/make_fixtures.sh

clean-deps:
	rm -rf .deps

# Our own tiny model (README "Our own model"): trains VAE, CLIP and UNet from scratch on the
# procedural shapes set with a fixed seed, resuming from the checkpoints in out/train/ when
# interrupted (TRAIN_ARGS=--fresh starts over), and writes models/tiny.
.PHONY: train-tiny eval
train-tiny: build
	OMP_WAIT_POLICY=PASSIVE cargo run --quiet --bin sd -- train --work-dir out/train --model-dir models/tiny $(TRAIN_ARGS)

# Prompt adherence of a model (default models/tiny) judged by the analytic shape checker.
EVAL_MODEL ?= models/tiny
eval: build
	OMP_WAIT_POLICY=PASSIVE cargo run --quiet --bin sd -- eval --model "$(EVAL_MODEL)" --sheet out/eval-sheet.png $(EVAL_ARGS)
