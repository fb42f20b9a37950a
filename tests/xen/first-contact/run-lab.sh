#!/bin/bash
# Run the first-contact test on the xenlab (a real Xen 4.17 dom0 + Linux guest under QEMU TCG):
# build ferrotap (release) and ftcheck (static), assemble the LAB_EXTRA folder in a temporary
# directory, boot the lab and exit with its status. Needs root (the lab does).
#   env: XENLAB (default /work/shared/xenlab/lab.sh), LAB_DIR (lab's, default /var/tmp/xenlab),
#        KEEP_EXTRA=1 keeps the assembled folder (its path is printed).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../../.." && pwd)
XENLAB=${XENLAB:-/work/shared/xenlab/lab.sh}

(cd "$ROOT" && cargo build --release --workspace --quiet)
EXTRA=$(mktemp -d /var/tmp/ft-first-contact.XXXXXX)
[ "${KEEP_EXTRA:-0}" = 1 ] || trap 'rm -rf "$EXTRA"' EXIT
mkdir -p "$EXTRA/domu/bin"
# Debug info off (18 MB -> a few), symbols kept for backtraces.
objcopy --strip-debug "$ROOT/target/release/ferrotap" "$EXTRA/ferrotap"
objcopy --strip-debug "$ROOT/target/release/ferrotap-shim" "$EXTRA/ferrotap-shim"
gcc -O2 -Wall -Wextra -Werror -static -o "$EXTRA/ftcheck" "$HERE/ftcheck.c"
cp "$EXTRA/ftcheck" "$EXTRA/domu/bin/ftcheck"
cp "$HERE/domu/init" "$EXTRA/domu/init"
cp "$HERE/run.sh" "$HERE/ftctl.py" "$HERE/dom0-packages" "$EXTRA/"
chmod +x "$EXTRA/domu/init" "$EXTRA/ftctl.py"
echo "first-contact: LAB_EXTRA=$EXTRA"

# No XSAVE for the emulated CPU: with it, Xen 4.17 under QEMU 7.2 TCG lets the vector
# registers (xmm/ymm 0-2) of dom0 processes change under them while a guest runs, which shows
# up as heap corruption and segfaults in any dom0 process (tests/xen/README.md, "The dom0
# corruption: the lab's emulated XSAVE"). Without XSAVE Xen and Linux use FXSAVE.
export LAB_CPU=${LAB_CPU:-max,-smap,-xsave}
set +e
LAB_EXTRA="$EXTRA" "$XENLAB" run
rc=$?
set -e
LOG=$(ls -t "${LAB_DIR:-/var/tmp/xenlab}"/serial-*.log 2>/dev/null | head -1)
echo "first-contact: lab exit status $rc; serial log $LOG"
[ -n "$LOG" ] && grep -aE 'RESULT|NEGOTIATED|STATS:' "$LOG" | cut -c1-300 || true
exit $rc
