#!/usr/bin/env bash
# ferrotap's benchmarks. Usage:
#   bench/run.sh image [--quick] [--dir DIR]... [--jobs N] [--runtime-ms MS] [--size-mib MIB] [--out FILE]
#   bench/run.sh ring [--quick | --options] [--dir DIR]... [--rounds N] [--runtime-ms MS] [--out FILE]
#   bench/run.sh nbd [--quick] [--peer NAME=URI]... [--dir DIR] [--rounds N] [--runtime-ms MS] [--out FILE]
# Builds ferrotap and ferrotap-bench in release, then runs the image-layer benchmark (image),
# ferrotap serve under the simulated blkfront (ring), beside fio, or ferrotap nbd beside
# qemu-nbd and nbdkit under fio's nbd engine (nbd).
# See bench/README.md for what is measured and how to read it.
set -euo pipefail

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 1 ] || usage
suite=$1
shift
case "$suite" in
image | ring | nbd) ;;
-h | --help) usage ;;
*)
    echo "run.sh: unknown benchmark '$suite' (known: image, ring, nbd)" >&2
    exit 2
    ;;
esac

command -v fio >/dev/null || {
    echo "run.sh: fio is needed (apt-get install fio)" >&2
    exit 1
}

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# ring runs the ferrotap binary (serve, xensim blkfront) built next to ferrotap-bench.
cargo build --release -p ferrotap -p ferrotap-bench
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
exec "${target_dir:-$root/target}/release/ferrotap-bench" "$suite" "$@"
