#!/usr/bin/python3
"""dom0 helpers of the real-Xen lab test.

ftctl.py check-negotiated OUTDIR EXPECT
                                   EXPECT is "persistent=1 indirect=1 queues=2 order=2":
                                   what serve says it connected (OUTDIR/info.json,
                                   `ferrotap ctl info`) and what the guest's blkfront said
                                   it uses (its dmesg line in OUTDIR/console.log) must
                                   match; prints "NEGOTIATION: ..." lines, exit 1 on a
                                   mismatch

ftctl.py check-stats OUTDIR MODE   judge OUTDIR/stats.json (`ferrotap ctl stats` after the
                                   disconnect) against OUTDIR/info.json (`ferrotap ctl info`
                                   while connected: its "frontend") and the guest's
                                   workload (MODE: ftcheck's modes, e.g. guest,
                                   readonly, backing,guest or stream); prints
                                   "STATS: ..." lines, exit 1 on a failure
"""
import json
import os
import re
import sys

# What ftcheck's guest mode moves at least (bytes): written regions + the 8 MiB from the
# pinned writers + the 1 MiB later discarded; it reads all of them back and two zero regions.
MIN_WRITTEN = 4096 + 4096 + 1024 + (1 << 20) + (8 << 20) + (1 << 20)
MIN_READ = MIN_WRITTEN + (1 << 20) + (1 << 20) + 4096
# readonly mode reads what guest mode left: the written regions, the discarded and the two
# untouched ones.
MIN_READ_RO = MIN_WRITTEN + (1 << 20) + 4096


def check_stats(outdir, modes):
    failures = []
    # backing,guest: the check of the base region reads more; judge by the workload.
    mode = modes.split(",")[-1]
    with open(os.path.join(outdir, "info.json")) as f:
        negotiated = json.load(f)["frontend"]
    with open(os.path.join(outdir, "stats.json")) as f:
        stats = json.load(f)
    queues = stats.get("queues", [])
    for i, q in enumerate(queues):
        print("STATS: queue %d: %s" % (i, " ".join("%s=%s" % kv for kv in sorted(q.items())
                                                     if not isinstance(kv[1], dict))))

    def total(key):
        return sum(q.get(key, 0) for q in queues)

    print("STATS: total requests=%d reads=%d writes=%d flushes=%d discards=%d errors=%d "
          "unsupported=%d bytes_read=%d bytes_written=%d persistent_grants=%d grant_copies=%d"
          % tuple(total(k) for k in ("requests", "reads", "writes", "flushes", "discards",
                                     "errors", "unsupported", "bytes_read", "bytes_written",
                                     "persistent_grants", "grant_copies")))
    if len(queues) != negotiated["queues"]:
        failures.append("%d queues in stats, %d negotiated" % (len(queues), negotiated["queues"]))
    for i, q in enumerate(queues):
        if q.get("requests", 0) == 0:
            failures.append("queue %d served no request" % i)
    for key in ("errors", "unsupported", "in_flight"):
        if total(key) != 0:
            failures.append("%s = %d" % (key, total(key)))
    if mode == "readonly":
        for key in ("writes", "bytes_written", "discards"):
            if total(key) != 0:
                failures.append("%s = %d on a read-only disk" % (key, total(key)))
        if total("bytes_read") < MIN_READ_RO:
            failures.append("bytes_read %d < %d" % (total("bytes_read"), MIN_READ_RO))
    elif mode == "stream":
        # At least one 64 KiB block written and read back, and the final fsync.
        if total("bytes_written") < 65536 or total("bytes_read") < 65536:
            failures.append("stream: %d bytes written, %d read"
                            % (total("bytes_written"), total("bytes_read")))
        if total("flushes") == 0:
            failures.append("no flush served (the guest fsynced)")
    else:
        if total("bytes_written") < MIN_WRITTEN:
            failures.append("bytes_written %d < %d" % (total("bytes_written"), MIN_WRITTEN))
        if total("bytes_read") < MIN_READ:
            failures.append("bytes_read %d < %d" % (total("bytes_read"), MIN_READ))
        if total("flushes") == 0:
            failures.append("no flush served (the guest fsynced)")
        if total("discards") == 0:
            failures.append("no discard served (the guest issued BLKDISCARD)")
    if negotiated.get("persistent") and total("persistent_grants") == 0:
        failures.append("persistent grants negotiated but none kept")
    if not negotiated.get("persistent") and total("persistent_grants") != 0:
        failures.append("persistent grants kept without feature-persistent")
    for f in failures:
        print("STATS: FAIL " + f)
    print("STATS: %s" % ("FAIL" if failures else "ok"))
    return 1 if failures else 0


def check_negotiated(outdir, expect):
    want = dict(item.split("=", 1) for item in expect.split())
    with open(os.path.join(outdir, "info.json")) as f:
        frontend = json.load(f)["frontend"]
    # "blkfront: xvda: flush diskcache: enabled; persistent grants: enabled; indirect
    # descriptors: enabled; bounce buffer: ..."
    blkfront = {}
    with open(os.path.join(outdir, "console.log"), errors="replace") as f:
        for line in f:
            found = re.search(r"persistent grants: (\w+); indirect descriptors: (\w+)", line)
            if found:
                blkfront = {"persistent": found.group(1), "indirect": found.group(2)}
    seen = {
        "persistent (serve)": str(int(bool(frontend.get("persistent")))),
        "queues (serve)": str(frontend.get("queues")),
        "order (serve)": str(frontend.get("ring_page_order")),
        "persistent (blkfront)": {"enabled": "1", "disabled": "0"}.get(blkfront.get("persistent"), "?"),
        "indirect (blkfront)": {"enabled": "1", "disabled": "0"}.get(blkfront.get("indirect"), "?"),
    }
    failures = []
    for name, value in seen.items():
        key = name.split()[0]
        if key in want and want[key] != value:
            failures.append("%s = %s, expected %s" % (name, value, want[key]))
    print("NEGOTIATION: " + " ".join("%s=%s" % (k.replace(" ", ""), v) for k, v in seen.items()))
    for failure in failures:
        print("NEGOTIATION: FAIL " + failure)
    print("NEGOTIATION: %s" % ("FAIL" if failures else "ok (expected %s)" % expect))
    return 1 if failures else 0


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "check-stats":
        return check_stats(sys.argv[2], sys.argv[3])
    if len(sys.argv) == 4 and sys.argv[1] == "check-negotiated":
        return check_negotiated(sys.argv[2], sys.argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
