#!/usr/bin/env bash
# Writes the example layout of this directory into an etcd, the way an operator's tooling
# would: config/global, config/nodes/<node>, and for each plugins/<name>.json its module in
# 1 MiB chunks under blobs/sha256/<hex>/ followed by the manifest (so no agent ever sees a
# manifest whose module is not there yet).
#
#   deploy/etcd/seed.sh --endpoints http://127.0.0.1:2379 --module tagger=path/to/tagger.wasm
#
# Options:
#   --endpoints URL[,URL]   etcd client URLs (default: $ETCDCTL_ENDPOINTS or http://127.0.0.1:2379)
#   --prefix PREFIX         key prefix (default /edgeward/v1, as etcd.prefix)
#   --module NAME=FILE      the module of plugin NAME; every manifest in plugins/ needs one
#   --no-plugins            write the config documents only
#   --dir DIR               a layout directory other than this one
# etcdctl comes from $ETCDCTL or PATH; TLS and auth flags go in ETCDCTL_* variables
# (ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, ETCDCTL_USER).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dir=$here
endpoints=${ETCDCTL_ENDPOINTS:-http://127.0.0.1:2379}
prefix=/edgeward/v1
declare -A modules=()
plugins=1
chunk_size=$((1024 * 1024))

die() { printf 'seed.sh: %s\n' "$*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case $1 in
    --endpoints) endpoints=${2:?--endpoints needs a value}; shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a value}; shift 2 ;;
    --dir) dir=${2:?--dir needs a value}; shift 2 ;;
    --module)
      spec=${2:?--module needs NAME=FILE}
      [[ $spec == *=* ]] || die "--module $spec: expected NAME=FILE"
      modules[${spec%%=*}]=${spec#*=}
      shift 2 ;;
    --no-plugins) plugins=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[[ $prefix == /* && $prefix != */ ]] || die "--prefix $prefix: must start with / and not end with /"

etcdctl=${ETCDCTL:-etcdctl}
command -v "$etcdctl" >/dev/null || die "etcdctl not found (set ETCDCTL, or run scripts/setup.sh)"
command -v jq >/dev/null || die "jq not found (run scripts/setup.sh)"
ctl() { ETCDCTL_API=3 "$etcdctl" --endpoints="$endpoints" --command-timeout=10s "$@"; }

put_json() { # key file: checks the JSON first, so a typo never reaches the fleet
  jq -e . "$2" >/dev/null 2>&1 || die "$2: not valid JSON"
  jq -c . "$2" | ctl put "$1" >/dev/null
  printf 'seed.sh: put %s\n' "$1"
}

[ -f "$dir/config/global.json" ] && put_json "$prefix/config/global" "$dir/config/global.json"
for f in "$dir"/config/nodes/*.json; do
  [ -e "$f" ] || continue
  put_json "$prefix/config/nodes/$(basename "$f" .json)" "$f"
done

for f in "$dir"/plugins/*.json; do
  [ -e "$f" ] && [ $plugins -eq 1 ] || continue
  name=$(basename "$f" .json)
  module=${modules[$name]:-}
  [ -n "$module" ] || die "plugin $name: no module given (--module $name=FILE.wasm)"
  [ -f "$module" ] || die "plugin $name: module $module: no such file"
  sha=$(sha256sum "$module" | cut -d' ' -f1)
  size=$(stat -c %s "$module")
  chunks=$(( (size + chunk_size - 1) / chunk_size ))
  [ "$chunks" -ge 1 ] || die "plugin $name: module $module is empty"
  tmp=$(mktemp -d)
  split -b "$chunk_size" -d -a 4 "$module" "$tmp/"
  for c in "$tmp"/*; do
    ctl put "$prefix/blobs/sha256/$sha/$(basename "$c")" <"$c" >/dev/null
  done
  rm -rf "$tmp"
  printf 'seed.sh: put %s/blobs/sha256/%s/ (%d bytes in %d chunks)\n' "$prefix" "$sha" "$size" "$chunks"
  manifest=$(jq -c --arg sha "$sha" --argjson size "$size" --argjson chunks "$chunks" \
    '.sha256 = $sha | .module = {etcd: {size: $size, chunks: $chunks}}' "$f") \
    || die "$f: not valid JSON"
  [ "$(jq -r .name <<<"$manifest")" = "$name" ] || die "$f: \"name\" must be $name (the file name)"
  ctl put "$prefix/plugins/$name" "$manifest" >/dev/null
  printf 'seed.sh: put %s/plugins/%s (sha256 %s)\n' "$prefix" "$name" "$sha"
done
