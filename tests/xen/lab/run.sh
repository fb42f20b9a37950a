# The real-Xen lab test: ferrotap (linux platform) and blkback-shim serve a real Linux
# xen-blkfront in Xen guests. Sourced by the lab's dom0 init (/bin/sh = dash) as the test
# "extra", from /lab/extra, which holds: ferrotap and ferrotap-shim (release binaries),
# ftcheck and canary (static), ftctl.py, this file.
# blkback-shim runs the XenBus handshake with each guest's xen-blkfront on the real
# xenstored for the whole run. The lab gives T (log line) and mkcfg (writes /run/domu.cfg).
# No `exit` here: it would end the lab's init. Every case prints
# "RESULT PASS|FAIL xen-lab <case>".

FTX=/lab/extra
# Wait (at most $1 s) until the guest is gone, then print its console log. Not the lab's
# wait_domu: that reads the log the moment the domain is gone, and xenconsoled may not have
# written the last lines yet (seen once: the guest's verdict missing while dom0's check of
# the image passed). So wait for the kernel's last line ("reboot: ..."), or for the log to
# stop growing (a destroyed guest prints none), at most 10 s.
wait_guest() {
  i=0; while xl domid domu1 >/dev/null 2>&1 && [ $i -lt $1 ]; do sleep 1; i=$((i+1)); done
  xl domid domu1 >/dev/null 2>&1 && { T "TIMEOUT: domU still running, destroying"; xl destroy domu1; }
  log=/var/log/xen/console/guest-domu1.log
  last=-1; n=0
  while [ $n -lt 20 ] && ! grep -q 'reboot: ' $log 2>/dev/null; do
    size=$(stat -c %s $log 2>/dev/null || echo 0)
    [ "$size" = "$last" ] && [ $n -ge 6 ] && break
    last=$size; sleep 0.5; n=$((n+1))
  done
  T "domU gone after ${i} polls; console log:"
  cat $log; rm -f $log
}

DEV=51712   # xvda

# Per-case settings, read by ft_case (reset after each case):
#   CASE_SPAWN=1      params names the image: the shim starts serve (default: the case starts
#                     serve with its options and params names serve's control socket)
#   CASE_DURING=fn    run `fn` in the background once the guest is unpaused
#   CASE_VERIFY=mode  ftcheck's dom0 check of the image contents (verify by default;
#                     verify-backing, verify-stream; none)
#   CASE_TOP=file     the chain's top to check (a snapshot's leaf; default: the image)
#   CASE_ARG=seconds  how long the guest's stream writes
#   CASE_DESTROY=1    the guest is destroyed mid-I/O: it reports nothing, and serve's stats
#                     (taken before the destroy) are judged by the during function
#   CASE_EXPECT="persistent=1 indirect=1 queues=2 order=2"  what must have been negotiated,
#                     by serve's account and by blkfront's own dmesg line (ftctl.py)
reset_case() { CASE_SPAWN=0; CASE_DURING=""; CASE_VERIFY=verify; CASE_TOP=""; CASE_ARG=""; CASE_DESTROY=0; CASE_EXPECT=""; }
reset_case

# Checks that apply after every guest, whatever the case: nothing left behind.
#   no serve process (the shim's own stays), no grant mapping in any process, no domain
#   (a mapping left behind keeps a dead domain as a zombie), no vbd3 backend node.
check_nothing_left() {
  sleep 1
  left=$(ps -eo comm | grep -cx 'ferrotap')
  [ "$left" = 0 ] || { fails="$fails ferrotap-left"; ps -eo pid,args | grep '[f]errotap'; }
  maps=$(grep -l '/dev/xen/gntdev' /proc/[0-9]*/maps 2>/dev/null)
  [ -z "$maps" ] || { fails="$fails gntdev-mapping-left"; T "gntdev still mapped by: $maps"; }
  [ -z "$(xenstore-ls /local/domain/0/backend/vbd3/$D 2>/dev/null)" ] \
    || { fails="$fails backend-nodes-left"; xenstore-rm /local/domain/0/backend/vbd3/$D; }
  xenstore-read /local/domain/$D/name >/dev/null 2>&1 && fails="$fails frontend-domain-nodes-left"
  xl list
  [ "$(xl list | wc -l)" = 2 ] || fails="$fails domain-left"
  kill -0 $shimpid 2>/dev/null || fails="$fails shim-died"
}

# Total of one counter over serve's queues (`ferrotap ctl stats` with the given target).
serve_total() { # KEY CTL-ARGS...
  # The pretty-printed JSON has its keys sorted: the last "KEY": line is in "totals".
  key=$1; shift
  $FTX/ferrotap ctl stats "$@" 2>/dev/null \
    | awk -v k="\"$key\":" '$1 == k { v = $2 } END { gsub(/,/, "", v); print v + 0 }'
}

# Wait (max ~3 minutes) until serve has written something for the guest.
wait_for_writes() { # CTL-ARGS...
  i=0
  while [ "$(serve_total writes "$@")" = 0 ] && [ $i -lt 600 ]; do sleep 0.25; i=$((i+1)); done
  T "serve has taken $(serve_total writes "$@") writes"
}

# ft_case NAME IMAGE FORMAT BLKFRONT_PARAMS VCPUS MEMORY_MIB MODE [SERVE_ARGS...]
#   serves IMAGE to a new domu1 with xen-blkfront loaded with BLKFRONT_PARAMS (a=1,b=2),
#   runs `ftcheck MODE /dev/xvda` in the guest (stream: for CASE_ARG seconds), then checks serve's stats, that nothing is left
#   behind and the image contents from dom0.
ft_case() {
  name=$1; img=$2; fmt=$3; params=$4; vcpus=$5; mem=$6; mode=$7; shift 7
  arg=""; [ $mode = stream ] && arg=${CASE_ARG:-30}
  vbdmode=w; [ $mode = readonly ] && vbdmode=r
  out=/run/ft-$name; rm -rf $out; mkdir -p $out
  fails=""
  dmesg -c > /dev/null   # this case's kernel messages only, checked at the end
  T "=== xen-lab case $name: $fmt image $img, blkfront $params, $vcpus vCPUs, $mem MiB, ftcheck $mode $arg, serve $* ==="
  [ $mode = readonly ] && sum_before=$(md5sum < $img)
  ctl=/run/ft-$name.ctl
  if [ $CASE_SPAWN = 1 ]; then
    ftpid=""; target=$img
  else
    mkfifo $out/serve.fifo
    sed -u 's/^/FERROTAP: /' < $out/serve.fifo &
    RUST_BACKTRACE=1 $FTX/ferrotap serve --image $img --control $ctl --max-queues 2 "$@" \
        > $out/serve.fifo 2>&1 &
    ftpid=$!
    i=0; while [ ! -S $ctl ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
    T "ferrotap serve pid $ftpid, control socket $ctl after ${i}x0.1s"
    target=$ctl
  fi

  mkcfg ""
  sed -i "s/^vcpus = .*/vcpus = $vcpus/; s/^memory = .*/memory = $mem/" /run/domu.cfg
  sed -i "s#^extra = \"\(.*\)\"#extra = \"\1 ftblk=$params ftmode=$mode ftarg=$arg\"#" /run/domu.cfg
  if ! xl create -p /run/domu.cfg; then
    T "RESULT FAIL xen-lab $name: xl create failed"
    [ -n "$ftpid" ] && { $FTX/ferrotap ctl close --control $ctl; wait $ftpid; }
    reset_case; return
  fi
  D=$(xl domid domu1)
  BE=/local/domain/0/backend/vbd3/$D/$DEV; FE=/local/domain/$D/device/vbd/$DEV
  # From here on, serve is reached by its VBD: the case's own serve and one the shim started.
  vbd="--vbd $D/$DEV"
  # The toolstack's part, as `ferrotap vbd attach` writes it.
  ro=""; [ $vbdmode = r ] && ro=--read-only
  $FTX/ferrotap vbd attach --domid $D --vdev xvda --params $target $ro || fails="$fails attach"
  # Record what was negotiated once the shim has connected the rings: xenstore's keys on both
  # sides and serve's view of the frontend.
  (
    i=0
    while [ "$(xenstore-read $BE/state 2>/dev/null)" != 4 ] && [ $i -lt 1200 ]; do
      sleep 0.25; i=$((i+1))
    done
    xenstore-ls $FE > $out/frontend-keys.txt 2>&1
    xenstore-ls $BE > $out/backend-keys.txt 2>&1
    $FTX/ferrotap ctl info $vbd > $out/info.json 2>&1
  ) &
  recpid=$!
  T "domid $D, vbd attached ($target); unpause"; xl unpause domu1
  duringpid=""
  if [ -n "$CASE_DURING" ]; then $CASE_DURING > $out/during.log 2>&1 & duringpid=$!; fi
  wait_guest 400 > $out/console.log 2>&1
  cat $out/console.log
  wait $recpid
  if [ -n "$duringpid" ]; then
    wait $duringpid || fails="$fails $CASE_DURING"
    sed 's/^/DURING: /' $out/during.log
  fi
  T "XENSTORE frontend: $(grep -E 'ring-ref|ring-page-order|multi-queue|event-channel|protocol|feature-persistent' $out/frontend-keys.txt | tr -s ' ' | tr '\n' ' ')"
  T "XENSTORE backend: $(grep -E 'feature-|max-ring|multi-queue|sectors|info|state' $out/backend-keys.txt | tr -s ' ' | tr '\n' ' ')"
  if python3 -c "import json,sys; sys.exit(0 if json.load(open('$out/info.json')).get('frontend') else 1)" 2>/dev/null; then
    T "NEGOTIATED $name: $(python3 -c "import json; print(json.dumps(json.load(open('$out/info.json'))['frontend']))")"
    if [ -n "$CASE_EXPECT" ]; then
      python3 $FTX/ftctl.py check-negotiated $out "$CASE_EXPECT" || fails="$fails negotiation"
    fi
  else
    fails="$fails no-connect"; cat $out/info.json
  fi
  # The toolstack's cleanup; after a destroy the frontend's nodes are already gone.
  $FTX/ferrotap vbd detach --domid $D --vdev xvda --timeout 60 || fails="$fails detach"
  if [ $CASE_DESTROY = 0 ]; then
    grep -q '^DOMU: RESULT PASS' $out/console.log || fails="$fails guest"
    $FTX/ferrotap ctl stats --control $ctl > $out/stats.json 2>&1
    if [ -s $out/stats.json ]; then
      python3 $FTX/ftctl.py check-stats $out $mode || fails="$fails stats"
    else
      fails="$fails no-stats"
    fi
  fi
  if [ -n "$ftpid" ]; then
    T "close: $($FTX/ferrotap ctl close --control $ctl 2>&1 | tr -d '\n')"
    i=0; while kill -0 $ftpid 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done
    if kill -0 $ftpid 2>/dev/null; then fails="$fails serve-still-running"; kill $ftpid; fi
    wait $ftpid; rc=$?
    T "ferrotap serve exit status $rc after close"
    [ $rc = 0 ] || fails="$fails serve-exit-$rc"
  fi
  check_nothing_left

  # The image's contents, checked from dom0 with ftcheck's pattern generator: the raw file
  # itself, or a raw export of the chain (qemu-img for qcow2, `ferrotap img` for VHD, whose
  # differencing chains qemu-img cannot read).
  top=${CASE_TOP:-$img}
  if [ "$CASE_VERIFY" != none ]; then
    check_file=$top
    case $fmt in
      raw) ;;
      qcow2) check_file=$out/export.raw
             qemu-img convert -O raw $top $check_file || fails="$fails qemu-img-convert"
             qemu-img check $top || fails="$fails qemu-img-check" ;;
      vhd)   check_file=$out/export.raw
             $FTX/ferrotap img convert -O raw $top $check_file || fails="$fails img-convert"
             $FTX/ferrotap img check $top || fails="$fails img-check" ;;
    esac
    varg=""
    [ $CASE_VERIFY = verify-stream ] && varg=$(sed -n 's/^DOMU: stream wrote \([0-9]*\) blocks.*/\1/p' $out/console.log | tail -1)
    $FTX/ftcheck $CASE_VERIFY $check_file $varg || fails="$fails verify"
    rm -f $out/export.raw
  fi
  # A kernel warning while serve maps guest pages and does O_DIRECT into them fails the case;
  # so does any dom0 process dying (the lab boots without XSAVE, README: with it, dom0
  # processes' vector registers changed while a guest ran).
  if dmesg | grep -E 'BUG|Oops|WARNING|Call Trace' | sed 's/^/DOM0-KERNEL: /' | grep .; then
    fails="$fails dom0-kernel-messages"
  fi
  if dmesg | grep -E 'traps:|segfault' | sed 's/^/DOM0-USER-CRASH: /' | grep .; then
    fails="$fails dom0-process-crashed"
  fi
  if [ $mode = readonly ]; then
    [ "$(md5sum < $img)" = "$sum_before" ] && T "image unchanged by the read-only guest" \
      || fails="$fails read-only-image-changed"
  fi
  if [ -z "$fails" ]; then
    T "RESULT PASS xen-lab $name"
  else
    T "RESULT FAIL xen-lab $name:$fails"
  fi
  reset_case
}

# During the lifecycle case: pause and unpause while the guest writes, then take a snapshot
# onto a new qcow2 leaf while it goes on writing. Uses $vbd, $img, $ftpid, $out of ft_case.
lifecycle() {
  rc=0
  wait_for_writes $vbd
  before=$(serve_total writes $vbd)
  $FTX/ferrotap ctl pause $vbd || { echo "pause failed"; rc=1; }
  paused_at=$(serve_total writes $vbd)
  fds=$(ls -l /proc/$ftpid/fd 2>/dev/null | grep -c "$img")
  inflight=$(serve_total in_flight $vbd)
  echo "paused after $before writes: in flight $inflight, image fds open $fds"
  [ "$fds" = 0 ] || { echo "FAIL the paused serve keeps the image open"; rc=1; }
  [ "$inflight" = 0 ] || { echo "FAIL requests in flight while paused"; rc=1; }
  sleep 2
  [ "$(serve_total writes $vbd)" = "$paused_at" ] || { echo "FAIL writes served while paused"; rc=1; }
  $FTX/ferrotap ctl unpause $vbd || { echo "unpause failed"; rc=1; }
  sleep 3
  after=$(serve_total writes $vbd)
  echo "unpaused: $after writes"
  [ "$after" -gt "$paused_at" ] || { echo "FAIL no write after unpause"; rc=1; }
  # Snapshot: pause, a new qcow2 leaf on the image, unpause onto it.
  $FTX/ferrotap ctl pause $vbd || { echo "pause for the snapshot failed"; rc=1; }
  md5sum < $img > $out/base.md5
  qemu-img create -q -f qcow2 -b $img -F raw $CASE_TOP || rc=1
  $FTX/ferrotap ctl unpause $vbd --path $CASE_TOP --format qcow2 || { echo "unpause onto the leaf failed"; rc=1; }
  echo "snapshot taken after $(serve_total writes $vbd) writes; serve now on $(ls -l /proc/$ftpid/fd | grep -c "$CASE_TOP") fd(s) of the leaf"
  return $rc
}

# During the first case: the lab's own sanity. Two canaries per vCPU check, while the guest
# boots and works, that dom0 processes keep their registers and heap (with the emulated
# CPU's XSAVE they did not: tests/xen/README.md).
run_canaries() {
  for c in 0 1; do
    taskset -c $c $FTX/canary xmm 30 > /run/canary-x$c 2>&1 &
    taskset -c $c $FTX/canary heap 30 > /run/canary-h$c 2>&1 &
  done
  wait
  cat /run/canary-* | sed 's/^/ENV: /'
  ! cat /run/canary-* | grep -q ' [1-9][0-9]* bad\|changed'
}

# During the destroy case: `xl destroy` the guest in the middle of its writes (serve, which
# the shim started, goes with the VBD: its stats are looked at before).
destroy_mid_io() {
  wait_for_writes $vbd
  writes=$(serve_total writes $vbd)
  echo "serve served $writes writes, $(serve_total in_flight $vbd) in flight; errors $(serve_total errors $vbd)"
  [ "$writes" -gt 0 ] || return 1
  xl destroy domu1 && echo "domain destroyed mid-I/O"
}

T "xen-lab: $($FTX/ferrotap --version 2>&1)"
# blkback-shim for the whole run, on the real xenstored.
mkfifo /run/ft-shim.fifo
sed -u 's/^/SHIM: /' < /run/ft-shim.fifo &
$FTX/ferrotap-shim --run-dir /run/ferrotap --ferrotap $FTX/ferrotap > /run/ft-shim.fifo 2>&1 &
shimpid=$!
sleep 1
kill -0 $shimpid 2>/dev/null && T "blkback-shim pid $shimpid" || T "RESULT FAIL xen-lab: blkback-shim did not start"

# 1. Everything blkfront can negotiate on: 4-page rings, 2 queues, 64-segment indirect
#    requests, persistent grants; io_uring. blkfront keeps a page per grant it may use (ring
#    entries x (segments + indirect pages) per queue): 128 x 65 x 2 pages = 65 MiB here.
rm -f /lab/ft-disk.raw; truncate -s 256M /lab/ft-disk.raw
CASE_DURING=run_canaries; CASE_EXPECT="persistent=1 indirect=1 queues=2 order=2"
ft_case raw-all /lab/ft-disk.raw raw \
  max_ring_page_order=2,max_queues=2,max_indirect_segments=64 2 512 guest --engine uring
# 2. A second guest on the same image, read-only (mode=r, serve --read-only, info=4): it
#    reads what the first guest wrote and cannot write. One page, one queue.
CASE_EXPECT="persistent=1 indirect=1 queues=1 order=1"
ft_case raw-read-only /lab/ft-disk.raw raw max_ring_page_order=1 1 256 readonly --read-only
# 3. Each feature off in turn, as a frontend without it would negotiate.
#    Without persistent grants: grant copy.
rm -f /lab/ft-disk.raw; truncate -s 256M /lab/ft-disk.raw
CASE_EXPECT="persistent=0 indirect=1 queues=2 order=2"
ft_case raw-no-persistent /lab/ft-disk.raw raw \
  feature_persistent=0,max_ring_page_order=2,max_queues=2,max_indirect_segments=64 2 512 guest
#    No indirect segments (at most 11 per request).
rm -f /lab/ft-disk.raw; truncate -s 256M /lab/ft-disk.raw
CASE_EXPECT="persistent=1 indirect=0 queues=2 order=2"
ft_case raw-no-indirect /lab/ft-disk.raw raw \
  max_ring_page_order=2,max_queues=2,max_indirect_segments=0 2 512 guest
#    One-page ring, on a qcow2 whose backing file holds data (read through the overlay),
#    with the native AIO engine; qemu-img makes and checks it, the base must stay unchanged.
rm -f /lab/ft-base.raw /lab/ft-top.qcow2
truncate -s 256M /lab/ft-base.raw && $FTX/ftcheck fill-base /lab/ft-base.raw > /dev/null
qemu-img create -q -f qcow2 -b /lab/ft-base.raw -F raw /lab/ft-top.qcow2
base_sum=$(md5sum < /lab/ft-base.raw)
CASE_VERIFY=verify-backing; CASE_EXPECT="persistent=1 indirect=1 queues=2 order=0"
ft_case qcow2-backing-one-page /lab/ft-top.qcow2 qcow2 \
  max_ring_page_order=0,max_queues=2,max_indirect_segments=256 2 512 backing,guest --engine aio
[ "$(md5sum < /lab/ft-base.raw)" = "$base_sum" ] && T "the qcow2's backing file is unchanged" \
  || T "RESULT FAIL xen-lab qcow2-backing-one-page: the backing file was written"
rm -f /lab/ft-base.raw /lab/ft-top.qcow2
#    One queue (2 vCPUs share it), on a differencing VHD chain: a dynamic VHD holding the
#    base data (converted from raw) under a differencing child, made by ferrotap.
rm -f /lab/ft-base.raw /lab/ft-base.vhd /lab/ft-child.vhd
truncate -s 256M /lab/ft-base.raw && $FTX/ftcheck fill-base /lab/ft-base.raw > /dev/null
$FTX/ferrotap img convert -O vpc /lab/ft-base.raw /lab/ft-base.vhd
$FTX/ferrotap img create -q -f vhd -b /lab/ft-base.vhd /lab/ft-child.vhd
base_sum=$(md5sum < /lab/ft-base.vhd)
CASE_VERIFY=verify-backing; CASE_EXPECT="persistent=1 indirect=1 queues=1 order=2"
ft_case vhd-chain-one-queue /lab/ft-child.vhd vhd \
  max_ring_page_order=2,max_queues=1,max_indirect_segments=64 2 512 backing,guest
[ "$(md5sum < /lab/ft-base.vhd)" = "$base_sum" ] && T "the VHD parent is unchanged" \
  || T "RESULT FAIL xen-lab vhd-chain-one-queue: the parent VHD was written"
rm -f /lab/ft-base.raw /lab/ft-base.vhd /lab/ft-child.vhd
# 4. Lifecycle while the guest writes: pause, unpause, then a snapshot onto a new qcow2
#    leaf; every block the guest wrote must be in the chain afterwards and the old image
#    must not change after the snapshot.
rm -f /lab/ft-disk.raw /lab/ft-leaf.qcow2; truncate -s 256M /lab/ft-disk.raw
CASE_DURING=lifecycle; CASE_VERIFY=verify-stream; CASE_TOP=/lab/ft-leaf.qcow2
CASE_ARG=60; CASE_EXPECT="persistent=1 indirect=1 queues=2 order=2"
ft_case lifecycle /lab/ft-disk.raw qcow2 \
  max_ring_page_order=2,max_queues=2,max_indirect_segments=64 2 512 stream
if [ -f /run/ft-lifecycle/base.md5 ] && [ "$(md5sum < /lab/ft-disk.raw)" = "$(cat /run/ft-lifecycle/base.md5)" ]; then
  T "the image under the snapshot is unchanged since the snapshot"
else
  T "RESULT FAIL xen-lab lifecycle: the image under the snapshot changed after it"
fi
if qemu-img map --output=json /lab/ft-leaf.qcow2 | grep -q '"depth": 0, .*"data": true'; then
  T "the leaf holds the writes after the snapshot"
else
  T "RESULT FAIL xen-lab lifecycle: nothing was written to the leaf"
fi
rm -f /lab/ft-leaf.qcow2
# 5. `xl destroy` in the middle of I/O, on a serve the shim started itself from params (the
#    toolstack's usual way): no process, mapping, domain or xenstore node may be left.
rm -f /lab/ft-disk.raw; truncate -s 256M /lab/ft-disk.raw
CASE_SPAWN=1; CASE_DURING=destroy_mid_io; CASE_VERIFY=none; CASE_ARG=120; CASE_DESTROY=1
ft_case destroy-mid-io /lab/ft-disk.raw raw \
  max_ring_page_order=2,max_queues=2,max_indirect_segments=64 2 512 stream
rm -f /lab/ft-disk.raw
kill $shimpid 2>/dev/null; wait $shimpid 2>/dev/null
