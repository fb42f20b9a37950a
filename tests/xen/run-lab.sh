#!/bin/bash
# The real-Xen test: ferrotap and blkback-shim serve a real Linux xen-blkfront in Xen guests,
# in the xenlab (Xen 4.17, a Debian PV dom0 and PV guests under QEMU TCG on this machine).
# Builds ferrotap (release), ftcheck and canary (static), assembles the lab's LAB_EXTRA
# folder (lab/), boots the lab, keeps its serial log as target/xen-lab/serial-<stamp>.log and
# exits with the lab's verdict (non-zero when any case failed or dom0 never finished).
# Needs root (the lab does). What each case proves: tests/xen/README.md.
#   env: XENLAB (the lab script; default ../shared/xenlab/lab.sh beside the repository, then
#        /work/shared/xenlab/lab.sh), LAB_DIR (the lab's, default /var/tmp/xenlab),
#        LAB_CPU (default max,-smap,-xsave), KEEP_EXTRA=1 keeps the assembled folder.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
if [ -z "${XENLAB:-}" ]; then
  for candidate in "$ROOT/../shared/xenlab/lab.sh" /work/shared/xenlab/lab.sh; do
    [ -f "$candidate" ] && { XENLAB=$candidate; break; }
  done
fi
if [ -z "${XENLAB:-}" ] || [ ! -f "$XENLAB" ]; then
  echo "xen-lab: FAIL: no xenlab script (looked for ../shared/xenlab/lab.sh beside the repository and /work/shared/xenlab/lab.sh; set XENLAB)" >&2
  exit 1
fi

(cd "$ROOT" && cargo build --release --workspace --quiet)
EXTRA=$(mktemp -d /var/tmp/ft-xen-lab.XXXXXX)
[ "${KEEP_EXTRA:-0}" = 1 ] || trap 'rm -rf "$EXTRA"' EXIT
mkdir -p "$EXTRA/domu/bin"
# Debug info off (18 MB -> a few), symbols kept for backtraces.
objcopy --strip-debug "$ROOT/target/release/ferrotap" "$EXTRA/ferrotap"
objcopy --strip-debug "$ROOT/target/release/ferrotap-shim" "$EXTRA/ferrotap-shim"
gcc -O2 -Wall -Wextra -Werror -static -o "$EXTRA/ftcheck" "$HERE/lab/ftcheck.c"
gcc -O2 -Wall -static -o "$EXTRA/canary" "$HERE/lab/canary.c"
cp "$EXTRA/ftcheck" "$EXTRA/domu/bin/ftcheck"
cp "$HERE/lab/domu/init" "$EXTRA/domu/init"
cp "$HERE/lab/run.sh" "$HERE/lab/ftctl.py" "$HERE/lab/dom0-packages" "$EXTRA/"
chmod +x "$EXTRA/domu/init" "$EXTRA/ftctl.py"
echo "xen-lab: LAB_EXTRA=$EXTRA"

# No XSAVE for the emulated CPU: with it, Xen 4.17 under QEMU 7.2 TCG lets the vector
# registers (xmm/ymm 0-2) of dom0 processes change under them while a guest runs, which shows
# up as heap corruption and segfaults in any dom0 process (tests/xen/README.md, "The lab's
# emulated XSAVE"). Without XSAVE, Xen and Linux use FXSAVE.
export LAB_CPU=${LAB_CPU:-max,-smap,-xsave}
export LAB_DIR=${LAB_DIR:-/var/tmp/xenlab}
started=$(date +%s)
set +e
LAB_EXTRA="$EXTRA" "$XENLAB" run
rc=$?
set -e
LOG=$(ls -t "$LAB_DIR"/serial-*.log 2>/dev/null | head -1 || true)
mkdir -p "$ROOT/target/xen-lab"
if [ -n "$LOG" ]; then
  cp "$LOG" "$ROOT/target/xen-lab/"
  LOG="$ROOT/target/xen-lab/$(basename "$LOG")"
fi
echo "xen-lab: lab exit status $rc after $(( $(date +%s) - started )) s; serial log $LOG"
if [ -n "$LOG" ]; then
  grep -aE 'RESULT|NEGOTIATED|NEGOTIATION: (ok|FAIL)|STATS: (ok|FAIL|total)|DURING:|DOM0-|ENV:' "$LOG" | cut -c1-300 || true
  echo "xen-lab: $(grep -ac 'RESULT PASS xen-lab' "$LOG") results passed, $(grep -ac 'RESULT FAIL' "$LOG") failed"
fi
exit $rc
