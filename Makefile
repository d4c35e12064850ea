# rolegate — see README.md. `make demo` and `make test` are the set-up.
GO      ?= go
BIN     := bin/rolegate
FUZZTIME ?= 8s
VERSION := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

.PHONY: all build test vet unit fuzz demo bench tools clean

all: build

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/rolegate

# Installs the PostgreSQL server binaries and Chromium (for the live page's
# browser test) when they are missing (as root), or says exactly what to install.
tools:
	@scripts/ensure-postgres.sh
	@scripts/ensure-chromium.sh

test: tools vet unit fuzz

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...

unit:
	$(GO) test -race -count=1 -timeout 8m ./...

# A short run of each fuzz target (scripts/fuzz.sh); a failing input lands in
# the package's testdata/fuzz and then runs in every `unit`.
FUZZ_TARGETS := proxy:FuzzStartupPacket proxy:FuzzScanner proxy:FuzzSASLInitialResponse \
	auth:FuzzSCRAMClientFirst auth:FuzzSCRAMClientFinal auth:FuzzSCRAMServerMessages \
	auth:FuzzUserlist auth:FuzzParseSecret limiter:FuzzDecide
fuzz:
	@GO="$(GO)" FUZZTIME="$(FUZZTIME)" scripts/fuzz.sh $(FUZZ_TARGETS)

demo: build
	@scripts/ensure-postgres.sh
	$(GO) run ./internal/demo -rolegate $(BIN)

bench: tools
	bench/run.sh

clean:
	rm -rf bin
