#!/usr/bin/python3
"""The XenBus half of a vbd3 backend, for `ferrotap serve` before the shim exists.

Runs in dom0 beside `ferrotap serve --control SOCK` and plays what the blkback shim will do
(../shared/xensim.md section 5): advertises the features serve offers (its `info` reply) in
the backend's xenstore directory, goes to InitWait, waits for the frontend's Initialised,
reads the transport keys the frontend wrote, sends them to serve as `connect`, writes the
disk geometry and goes to Connected. Then it follows the frontend: on Closing it records
serve's `stats`, sends `disconnect` and answers Closing; on Closed it answers Closed; when
the frontend's directory is gone (the domain died) it disconnects if still connected and exits.

Usage: handshake.py BE FE SOCK OUTDIR
OUTDIR receives negotiated.json (the frontend's transport keys) and stats.json (serve's
stats taken just before the disconnect). Every log line starts with "HANDSHAKE:".
"""
import json
import os
import socket
import subprocess
import sys
import time

CONNECT_TIMEOUT = 240  # seconds for the guest to boot and reach Initialised under TCG
POLL = 0.2


def log(*args):
    print("HANDSHAKE: [%.2f]" % time.monotonic(), *args, flush=True)


def xs_read(path):
    r = subprocess.run(["xenstore-read", path], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def xs_write(pairs):
    args = []
    for key, value in pairs:
        args += [key, str(value)]
    subprocess.run(["xenstore-write", *args], check=True)


def xs_ls(path):
    r = subprocess.run(["xenstore-ls", "-f", path], capture_output=True, text=True)
    return r.stdout


class Control:
    """serve's control socket: one JSON request line, one JSON reply line."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(100):
            try:
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise SystemExit("HANDSHAKE: cannot connect to " + path)
        self.reader = self.sock.makefile("r")

    def call(self, request):
        self.sock.sendall((json.dumps(request) + "\n").encode())
        line = self.reader.readline()
        if not line:
            raise RuntimeError("serve closed the control socket")
        return json.loads(line)


def wait_state(fe, wanted, timeout):
    """The frontend's state once it is in `wanted`, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = xs_read(fe + "/state")
        if state in wanted:
            return state
        time.sleep(POLL)
    return None


def xs_tree(path):
    """Every key under `path` (one xenstore-ls: each xenstore call costs a process)."""
    keys = {}
    for line in xs_ls(path).splitlines():
        key, sep, value = line.partition(" = ")
        if sep and key.startswith(path + "/"):
            keys[key[len(path) + 1:]] = value.strip().strip('"')
    return keys


def transport_keys(fe):
    """The connect request for the keys blkfront wrote (Linux xen-blkfront's layout)."""
    keys = xs_tree(fe)
    order = int(keys.get("ring-page-order", 0))
    nqueues = keys.get("multi-queue-num-queues")
    queues = []
    for q in range(int(nqueues or 1)):
        # Without multi-queue-num-queues the ring keys are in FE itself, else in FE/queue-N.
        qdir = "" if nqueues is None else "queue-%d/" % q
        if order == 0:
            # One page: "ring-ref" (blkfront writes it even beside ring-page-order=0).
            refs = [int(keys.get(qdir + "ring-ref") or keys[qdir + "ring-ref0"])]
        else:
            refs = [int(keys[qdir + "ring-ref%d" % i]) for i in range(1 << order)]
        queues.append({"ring_refs": refs, "event_channel": int(keys[qdir + "event-channel"])})
    request = {
        "op": "connect",
        "ring_page_order": order,
        "queues": queues,
        "persistent": keys.get("feature-persistent") == "1",
    }
    if "protocol" in keys:
        request["protocol"] = keys["protocol"]
    return request


def main():
    be, fe, sock, outdir = sys.argv[1:5]
    domid = int(xs_read(be + "/frontend-id"))
    ctl = Control(sock)
    info = ctl.call({"op": "info"})
    log("serve info:", json.dumps(info))
    f = info["features"]
    keys = [
        ("feature-flush-cache", int(f["flush"])),
        ("feature-barrier", int(f["barrier"])),
        ("feature-persistent", int(f["persistent"])),
        ("feature-max-indirect-segments", f["max_indirect_segments"]),
        ("max-ring-page-order", f["max_ring_page_order"]),
    ]
    if f["max_queues"] > 1:
        keys.append(("multi-queue-max-queues", f["max_queues"]))
    if f["discard"]:
        keys += [
            ("feature-discard", 1),
            ("discard-granularity", f["discard_granularity"]),
            ("discard-alignment", f["discard_alignment"]),
            ("discard-secure", int(f["discard_secure"])),
        ]
    xs_write([(be + "/" + k, v) for k, v in keys])
    xs_write([(be + "/state", 2)])
    log("backend keys written, state 2 (InitWait):", " ".join("%s=%s" % kv for kv in keys))

    state = wait_state(fe, ("3", "4"), CONNECT_TIMEOUT)
    if state is None:
        log("FAIL frontend never reached Initialised; its state:", xs_read(fe + "/state"))
        return 1
    log("frontend state %s; its keys:" % state)
    sys.stdout.write(xs_ls(fe))
    request = transport_keys(fe)
    request["domid"] = domid
    with open(os.path.join(outdir, "negotiated.json"), "w") as out:
        json.dump(request, out)
    log("connect:", json.dumps(request))
    reply = ctl.call(request)
    log("connect reply:", json.dumps(reply))
    if not reply.get("ok"):
        xs_write([(be + "/error", reply.get("error", "connect failed")), (be + "/state", 5)])
        return 1
    xs_write([
        (be + "/sectors", info["sectors"]),
        (be + "/sector-size", info["sector_size"]),
        (be + "/physical-sector-size", info["physical_sector_size"]),
        (be + "/info", 4 if info["read_only"] else 0),  # VDISK_READONLY
    ])
    xs_write([(be + "/state", 4)])
    log("state 4 (Connected): sectors=%d" % info["sectors"])
    if wait_state(fe, ("4",), 180) is None:
        log("FAIL frontend did not reach Connected; its state:", xs_read(fe + "/state"))
    else:
        log("frontend Connected; backend keys:")
        sys.stdout.write(xs_ls(be))
        log("serve info after connect:", json.dumps(ctl.call({"op": "info"})))

    connected = True

    def take_down(why):
        stats = ctl.call({"op": "stats"})
        with open(os.path.join(outdir, "stats.json"), "w") as out:
            json.dump(stats, out)
        log("stats before disconnect (%s):" % why, json.dumps(stats))
        log("disconnect reply:", json.dumps(ctl.call({"op": "disconnect"})))

    last = "4"
    while True:
        state = xs_read(fe + "/state")
        if state != last:
            log("frontend state", last, "->", state)
            last = state
        if state is None:
            if connected:
                take_down("frontend gone")
            log("frontend directory gone; done")
            return 0
        if state == "5" and connected:
            take_down("frontend Closing")
            connected = False
            xs_write([(be + "/state", 5)])
        elif state == "6":
            if connected:
                take_down("frontend Closed")
                connected = False
            if xs_read(be + "/state") != "6":
                xs_write([(be + "/state", 6)])
                log("state 6 (Closed)")
        time.sleep(POLL)


if __name__ == "__main__":
    sys.exit(main())
