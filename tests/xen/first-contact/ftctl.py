#!/usr/bin/python3
"""dom0 helpers of the first-contact test.

ftctl.py call SOCK JSON            send one request to `ferrotap serve`'s control socket,
                                   print the reply; exit 1 when it is not ok
ftctl.py check-stats OUTDIR        judge OUTDIR/stats.json (serve's stats just before the
                                   disconnect) against OUTDIR/negotiated.json and the guest's
                                   workload; prints "STATS: ..." lines, exit 1 on a failure
"""
import json
import os
import socket
import sys

# What ftcheck's guest mode moves at least (bytes): written regions + the 8 MiB from the
# pinned writers + the 1 MiB later discarded; it reads all of them back and two zero regions.
MIN_WRITTEN = 4096 + 4096 + 1024 + (1 << 20) + (8 << 20) + (1 << 20)
MIN_READ = MIN_WRITTEN + (1 << 20) + (1 << 20) + 4096


def call(sock_path, request):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        s.sendall((request.strip() + "\n").encode())
        return json.loads(s.makefile("r").readline())


def check_stats(outdir):
    failures = []
    with open(os.path.join(outdir, "negotiated.json")) as f:
        negotiated = json.load(f)
    with open(os.path.join(outdir, "stats.json")) as f:
        stats = json.load(f)
    queues = stats.get("queues", [])
    for i, q in enumerate(queues):
        print("STATS: queue %d: %s" % (i, " ".join("%s=%s" % kv for kv in sorted(q.items()))))

    def total(key):
        return sum(q.get(key, 0) for q in queues)

    print("STATS: total requests=%d reads=%d writes=%d flushes=%d discards=%d errors=%d "
          "unsupported=%d bytes_read=%d bytes_written=%d persistent_grants=%d"
          % tuple(total(k) for k in ("requests", "reads", "writes", "flushes", "discards",
                                     "errors", "unsupported", "bytes_read", "bytes_written",
                                     "persistent_grants")))
    if len(queues) != len(negotiated["queues"]):
        failures.append("%d queues in stats, %d negotiated" % (len(queues), len(negotiated["queues"])))
    for i, q in enumerate(queues):
        if q.get("requests", 0) == 0:
            failures.append("queue %d served no request" % i)
    for key in ("errors", "unsupported", "in_flight"):
        if total(key) != 0:
            failures.append("%s = %d" % (key, total(key)))
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


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "call":
        reply = call(sys.argv[2], sys.argv[3])
        print(json.dumps(reply))
        return 0 if reply.get("ok") else 1
    if len(sys.argv) == 3 and sys.argv[1] == "check-stats":
        return check_stats(sys.argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
