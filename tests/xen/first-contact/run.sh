# first-contact: ferrotap serve's linux platform against a real xen-blkfront, in the xenlab.
# Sourced by the lab's dom0 init (/bin/sh = dash) as the test "extra", from /lab/extra, which
# holds: ferrotap (release binary), ftcheck (static), handshake.py, ftctl.py, this file.
# The lab gives T (log line), mkcfg (writes /run/domu.cfg) and wait_domu. No `exit` here: it
# would end the lab's init. Every case prints "RESULT PASS|FAIL first-contact <case>".

FTX=/lab/extra

# ft_case NAME IMAGE FORMAT BLKFRONT_PARAMS VCPUS MEMORY_MIB
#   serves IMAGE to a new domu1 with xen-blkfront loaded with BLKFRONT_PARAMS (a=1,b=2),
#   runs ftcheck in the guest, then checks the image from dom0 and serve's stats.
ft_case() {
  name=$1; img=$2; fmt=$3; params=$4; vcpus=$5; mem=$6
  out=/run/ft-$name; rm -rf $out; mkdir -p $out
  fails=""
  T "=== first-contact case $name: $fmt image $img, blkfront $params, $vcpus vCPUs, $mem MiB ==="
  ctl=/run/ft-$name.ctl
  mkfifo $out/serve.fifo
  sed -u 's/^/FERROTAP: /' < $out/serve.fifo &
  RUST_BACKTRACE=1 $FTX/ferrotap serve --image $img --control $ctl --max-queues 2 \
      > $out/serve.fifo 2>&1 &
  ftpid=$!
  i=0; while [ ! -S $ctl ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  T "ferrotap serve pid $ftpid, control socket $ctl after ${i}x0.1s"

  mkcfg ""
  sed -i "s/^vcpus = .*/vcpus = $vcpus/; s/^memory = .*/memory = $mem/" /run/domu.cfg
  sed -i "s#^extra = \"\(.*\)\"#extra = \"\1 ftblk=$params\"#" /run/domu.cfg
  T "xl create -p"; xl create -p /run/domu.cfg; T "xl create rc=$?"
  D=$(xl domid domu1); DEV=51712
  BE=/local/domain/0/backend/vbd3/$D/$DEV; FE=/local/domain/$D/device/vbd/$DEV
  xenstore-write $BE/frontend $FE $BE/frontend-id $D $BE/online 1 $BE/removable 0 $BE/state 1 \
     $BE/dev xvda $BE/type vbd3 $BE/mode w $BE/device-type disk $BE/params $img
  xenstore-chmod -r /local/domain/0/backend/vbd3/$D n0 r$D
  xenstore-write $FE/backend $BE $FE/backend-id 0 $FE/state 1 $FE/virtual-device $DEV $FE/device-type disk
  xenstore-chmod -r $FE n$D r0
  python3 $FTX/handshake.py $BE $FE $ctl $out &
  hspid=$!
  T "domid $D, handshake pid $hspid; unpause"; xl unpause domu1
  wait_domu 300 > $out/console.log 2>&1
  cat $out/console.log
  i=0; while kill -0 $hspid 2>/dev/null && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
  kill -0 $hspid 2>/dev/null && { fails="$fails handshake-hung"; kill $hspid; }
  wait $hspid; T "handshake exit $? after ${i}s"

  grep -q '^DOMU: RESULT PASS' $out/console.log || fails="$fails guest"
  if [ -f $out/negotiated.json ]; then
    T "NEGOTIATED $name: $(cat $out/negotiated.json)"
  else
    fails="$fails no-connect"
  fi
  if [ -f $out/stats.json ]; then
    python3 $FTX/ftctl.py check-stats $out || fails="$fails stats"
  else
    fails="$fails no-stats"
  fi
  T "serve info after the guest: $(python3 $FTX/ftctl.py call $ctl '{"op":"info"}')"
  T "serve stats after disconnect: $(python3 $FTX/ftctl.py call $ctl '{"op":"stats"}')"
  T "close: $(python3 $FTX/ftctl.py call $ctl '{"op":"close"}')"
  i=0; while kill -0 $ftpid 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i+1)); done
  if kill -0 $ftpid 2>/dev/null; then fails="$fails serve-still-running"; kill $ftpid; fi
  wait $ftpid; rc=$?
  T "ferrotap serve exit status $rc after close"
  [ $rc = 0 ] || fails="$fails serve-exit-$rc"
  left=$(ps -eo pid,comm | grep -c '[f]errotap')
  [ "$left" = 0 ] || { fails="$fails ferrotap-left"; ps -eo pid,args | grep '[f]errotap'; }
  xenstore-rm /local/domain/0/backend/vbd3/$D
  # a grant mapping left behind keeps the dead domain as a zombie: xl list shows it
  sleep 1; xl list
  [ "$(xl list | wc -l)" = 2 ] || fails="$fails domain-left"

  case $fmt in
    raw) $FTX/ftcheck verify $img || fails="$fails verify" ;;
    *)   if qemu-img convert -O raw $img $out/export.raw; then
           $FTX/ftcheck verify $out/export.raw || fails="$fails verify"
           rm -f $out/export.raw
         else
           fails="$fails qemu-img-convert"
         fi
         qemu-img check $img || fails="$fails qemu-img-check" ;;
  esac
  if [ -z "$fails" ]; then
    T "RESULT PASS first-contact $name"
  else
    T "RESULT FAIL first-contact $name:$fails"
  fi
}

T "first-contact: $($FTX/ferrotap --version 2>&1)"
# Persistent grants, 4-page rings, 2 queues, 64-segment indirect requests. blkfront keeps a
# page per grant it may use (ring entries x (segments + indirect pages) per queue), 65 MiB
# here: at order 4 with 256 segments it would want 1 GiB and the guest dies of OOM.
rm -f /lab/ft-disk.raw; truncate -s 256M /lab/ft-disk.raw
ft_case raw-persistent-mq /lab/ft-disk.raw raw \
  max_ring_page_order=2,max_queues=2,max_indirect_segments=64 2 512
rm -f /lab/ft-disk.raw
# Grant copy (no persistent grants), one 1-page ring, 256-segment indirect requests, on a
# qcow2 overlay of an empty raw base (made by qemu-img, the oracle, which also checks it).
rm -f /lab/ft-base.raw /lab/ft-top.qcow2
qemu-img create -q -f raw /lab/ft-base.raw 256M
qemu-img create -q -f qcow2 -b /lab/ft-base.raw -F raw /lab/ft-top.qcow2
ft_case qcow2-copy /lab/ft-top.qcow2 qcow2 \
  feature_persistent=0,max_ring_page_order=0,max_queues=1,max_indirect_segments=256 1 256
if cmp -s -n 268435456 /lab/ft-base.raw /dev/zero; then
  T "base image untouched (all zeros): writes went to the qcow2 overlay"
else
  T "RESULT FAIL first-contact qcow2-copy: the raw base under the overlay was written"
fi
rm -f /lab/ft-base.raw /lab/ft-top.qcow2
