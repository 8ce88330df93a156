# noded — build, test and lab targets. Run as root on Debian 12.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := clang llvm libbpf-dev libbpf1 linux-libc-dev bpftool nftables iptables iproute2 util-linux \
                containernetworking-plugins python3-venv procps
BENCH_APT_PACKAGES := dnsperf unbound dnsmasq-base knot-resolver
BPF_SRC := $(wildcard bpf/*.c)
BPF_OBJ := $(patsubst bpf/%.c,noded/bpf/obj/%.o,$(BPF_SRC))
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I bpf/include -I/usr/include/$(shell uname -m)-linux-gnu

.PHONY: deps bpf test test-unit lint demo bench clean cleanup

deps: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: pyproject.toml Makefile
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

bpf: deps $(BPF_OBJ)

noded/bpf/obj/%.o: bpf/%.c $(wildcard bpf/include/*.h)
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c $< -o $@

test: bpf
	$(BIN)/pytest -ra

test-unit: deps
	$(BIN)/pytest -ra -m unit

lint: deps
	$(BIN)/ruff check noded tests bench

demo: bpf
	$(BIN)/noded lab demo

bench: bpf
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BENCH_APT_PACKAGES) >/dev/null
	$(BIN)/python bench/run.py

cleanup:
	-$(BIN)/noded lab down
	-$(BIN)/noded cleanup --all

clean: cleanup
	rm -rf $(VENV) noded/bpf/obj .pytest_cache
