# The two commands of the README: `make demo` and `make test`. Both set up libtorch first.
LIBTORCH ?= $(CURDIR)/.deps/libtorch
export LIBTORCH

PROMPT ?= a red circle on a white background
MODEL ?= tests/fixtures/tiny-sd1
OUT ?= out/demo.png

.PHONY: setup build demo test fixtures clean-deps

setup:
	@bash scripts/setup-libtorch.sh "$(CURDIR)/.deps/libtorch"

build: setup
	cargo build --bins

demo: build
	@mkdir -p $(dir $(OUT))
	cargo run --quiet --bin sd -- txt2img --model "$(MODEL)" --prompt "$(PROMPT)" --steps 20 --seed 42 --out "$(OUT)"

test: setup
	cargo test --no-fail-fast

# Regenerates tests/fixtures with diffusers/transformers (creates .venv-fixtures; needs PyPI).
fixtures:
	bash tools/make_fixtures.sh

clean-deps:
	rm -rf .deps
