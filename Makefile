# noded — build, test and lab targets. Run as root on Debian 12.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
APT_PACKAGES := clang llvm libbpf-dev libbpf1 linux-libc-dev gcc libc6-dev bpftool nftables iptables iproute2 util-linux \
                containernetworking-plugins python3-venv procps chromium-headless-shell busybox-static libyaml-dev
BENCH_APT_PACKAGES := dnsperf unbound dnsmasq-base knot-resolver haproxy wrk
BPF_SRC := $(wildcard bpf/*.c)
BPF_OBJ := $(patsubst bpf/%.c,noded/bpf/obj/%.o,$(BPF_SRC))
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I bpf/include -I/usr/include/$(shell uname -m)-linux-gnu

.PHONY: deps bpf test test-unit lint demo bench clean cleanup install uninstall image

deps: $(VENV)/.deps-stamp

$(VENV)/.deps-stamp: pyproject.toml Makefile
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

bpf: deps $(BPF_OBJ) noded/cni/bin/noded-cni noded/sources/libnoded_yaml.so

# noded-cni as a DaemonSet installs it on a host: static, no interpreter, no library
noded/cni/bin/noded-cni: cni/noded-cni.c
	@mkdir -p $(dir $@)
	gcc -static -O2 -Wall -Wextra -Werror $< -o $@

# manifests' YAML read to JSON in C (noded/sources/yamlfast.py); libyaml linked in: nothing to install with it
noded/sources/libnoded_yaml.so: native/yamljson.c
	gcc -O2 -Wall -Wextra -Werror -shared -fPIC $< -o $@ -Wl,--no-undefined -l:libyaml.a

noded/bpf/obj/%.o: bpf/%.c $(wildcard bpf/include/*.h)
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c $< -o $@

test: bpf
	$(BIN)/pytest -ra

test-unit: deps
	$(BIN)/pytest -ra -m unit

lint: deps
	$(BIN)/ruff check noded tests bench vagrant image

demo: bpf
	$(BIN)/noded lab demo

bench: bpf
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(BENCH_APT_PACKAGES) >/dev/null
	$(BIN)/python bench/run.py

# on a node: the package in /opt/noded (its own venv, the BPF objects built), `noded` on PATH, then the
# systemd unit, a default config and noded-cni (noded install); uninstall reverses it all
PREFIX ?= /opt/noded
install: bpf
	$(PYTHON) -m venv $(PREFIX)/venv
	$(PREFIX)/venv/bin/pip install -q .
	ln -sf $(PREFIX)/venv/bin/noded /usr/local/bin/noded
	/usr/local/bin/noded install
	systemctl daemon-reload 2>/dev/null || true

uninstall:
	-systemctl disable --now noded 2>/dev/null
	-/usr/local/bin/noded uninstall
	rm -f /usr/local/bin/noded
	rm -rf $(PREFIX)
	systemctl daemon-reload 2>/dev/null || true

# the OCI image, built here (debootstrap + this checkout's wheels), no registry: build/noded-image.tar
image: bpf
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
	$(BIN)/python image/build.py

cleanup:
	-$(BIN)/noded lab down
	-$(BIN)/noded cleanup --all

clean: cleanup
	rm -rf $(VENV) noded/bpf/obj noded/cni/bin .pytest_cache

# the Vagrant lab (README, "Vagrant lab"): too slow for CI, kept out of `make test`
VAGRANT_APT_PACKAGES := vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils \
                        debootstrap fdisk extlinux syslinux-common dnsmasq-base rsync openssh-client curl
.PHONY: vagrant-deps vagrant-box vagrant-lab vagrant-check vagrant-down vagrant-daemonset

vagrant-deps:
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(VAGRANT_APT_PACKAGES) >/dev/null

vagrant-box: vagrant-deps
	bash vagrant/build-box.sh

# up, the end-to-end check, then the deadlock scenario (node1's API server unreachable across a restart)
vagrant-lab: bpf vagrant-deps
	python3 vagrant/lab.py up
	python3 vagrant/lab.py check
	python3 vagrant/lab.py deadlock

vagrant-check:
	python3 vagrant/lab.py check

# deploy/daemonset.yaml's pod template run by containerd on the nodes (make image's archive) instead of the
# unit, the same check, a pod replacement (state kept), then the DaemonSet deleted (no CNI or kernel trace)
vagrant-daemonset: image vagrant-deps
	cp build/noded-image.tar vagrant/.cache/noded-image.tar
	python3 vagrant/lab.py up
	python3 vagrant/lab.py daemonset

vagrant-down:
	python3 vagrant/lab.py down
