# berth: build, run and test. Everything here needs root (containers need it).
CARGO ?= cargo
PREFIX ?= /usr/local

.PHONY: build run install test lint unit clean bench

build:
	scripts/install-deps.sh build
	$(CARGO) build --release

# Builds berthd and runs it in the foreground with the default config
# (root /var/lib/berth, state /run/berth, socket /run/berth/berth.sock).
run: build
	exec target/release/berthd

install: build
	install -m 0755 target/release/berthd $(PREFIX)/bin/berthd

# Every test: format and lint gates, unit tests, integration tests against a
# real berthd, a real registry on 127.0.0.1 and real kernel objects.
test: lint
	scripts/install-deps.sh test
	$(CARGO) test --lib --bins --tests -- --test-threads=$${BERTH_TEST_THREADS:-4}

lint:
	scripts/install-deps.sh build
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# berth beside containerd (installed from Debian when missing): one table,
# berth/containerd ratios. bench/README.md says what it measures; options go
# in BENCH_ARGS, e.g. make bench BENCH_ARGS="--samples 10".
bench:
	scripts/bench.sh $(BENCH_ARGS)

clean:
	$(CARGO) clean
