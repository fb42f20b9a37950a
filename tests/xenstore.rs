//! The xensim xenstored (`ferrotap xensim xenstored DIR`) driven by the stock clients —
//! Debian's xenstore-utils (libxenstore) and python3-pyxs — and ferrotap's own xenstore
//! client against both the server and the stock tools' view of it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use ferrotap::xenstore::wire::{self, Header, MsgType};
use ferrotap::xenstore::{Client, WatchEvent};

/// A running `ferrotap xensim xenstored` on a fresh directory; killed on drop.
struct Xenstored {
    dir: tempfile::TempDir,
    child: Child,
}

impl Xenstored {
    fn start() -> Xenstored {
        let dir = tempfile::Builder::new()
            .prefix("xs")
            .tempdir_in("/dev/shm")
            .unwrap();
        let child = spawn_server(dir.path());
        Xenstored { dir, child }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("xenstored")
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket()).unwrap()
    }

    /// A stock xenstore-utils command with XENSTORED_PATH pointing here.
    fn tool(&self, name: &str, args: &[&str]) -> Output {
        let program = Path::new("/usr/bin").join(name);
        assert!(
            program.exists(),
            "{} missing: install xenstore-utils (.ci/setup)",
            program.display()
        );
        Command::new(program)
            .args(args)
            .env("XENSTORED_PATH", self.socket())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Run the tool, require success, return its stdout.
    fn ok(&self, name: &str, args: &[&str]) -> String {
        let out = self.tool(name, args);
        assert!(
            out.status.success(),
            "{name} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `xenstore-watch PATH` as a child; its output lines arrive on the receiver.
    fn watch(&self, path: &str) -> ToolWatch {
        let mut child = Command::new("/usr/bin/xenstore-watch")
            .arg(path)
            .env("XENSTORED_PATH", self.socket())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("xenstore-watch (xenstore-utils) missing");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        ToolWatch { child, lines }
    }

    /// Run a python3-pyxs script with the socket path as argv[1]; its stdout.
    fn pyxs(&self, script: &str) -> String {
        let out = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .arg(self.socket())
            .stdin(Stdio::null())
            .output()
            .expect("/usr/bin/python3 missing");
        assert!(
            out.status.success(),
            "pyxs script failed (is python3-pyxs installed?):\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Xenstored {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn_server(dir: &Path) -> Child {
    let socket = dir.join("xenstored");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotap"))
        .args(["xensim", "xenstored"])
        .arg(dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "xenstored exited early"
        );
        assert!(Instant::now() < deadline, "xenstored did not start");
        thread::sleep(Duration::from_millis(10));
    }
    child
}

struct ToolWatch {
    child: Child,
    lines: Receiver<String>,
}

impl ToolWatch {
    fn expect(&self, line: &str) {
        match self.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(got) => assert_eq!(got, line),
            Err(_) => panic!("xenstore-watch printed no {line:?}"),
        }
    }

    fn expect_quiet(&self) {
        if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(300)) {
            panic!("unexpected xenstore-watch event {line:?}");
        }
    }
}

impl Drop for ToolWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(path: &str, token: &str) -> Option<WatchEvent> {
    Some(WatchEvent {
        path: path.to_string(),
        token: token.to_string(),
    })
}

fn next(client: &Client) -> Option<WatchEvent> {
    client.next_event(Some(Duration::from_secs(5))).unwrap()
}

fn quiet(client: &Client) {
    let got = client.next_event(Some(Duration::from_millis(200))).unwrap();
    assert_eq!(got, None, "unexpected watch event");
}

#[test]
fn stock_tools_tree_semantics() {
    let xs = Xenstored::start();
    // A write creates its parents, empty.
    xs.ok("xenstore-write", &["/vm/a/b/c", "value one", "/vm/x", "2"]);
    assert_eq!(xs.ok("xenstore-read", &["/vm/a/b/c"]), "value one\n");
    assert_eq!(xs.ok("xenstore-read", &["/vm/a/b"]), "\n");
    assert_eq!(xs.ok("xenstore-list", &["/vm"]), "a\nx\n");
    assert!(xs.tool("xenstore-exists", &["/vm/a"]).status.success());
    assert!(!xs.tool("xenstore-exists", &["/vm/nope"]).status.success());
    assert!(!xs.tool("xenstore-read", &["/vm/nope"]).status.success());
    // Relative paths live under /local/domain/0.
    xs.ok("xenstore-write", &["backend/vbd3/1/51712/state", "1"]);
    assert_eq!(
        xs.ok(
            "xenstore-read",
            &["/local/domain/0/backend/vbd3/1/51712/state"]
        ),
        "1\n"
    );
    assert_eq!(
        xs.ok("xenstore-read", &["backend/vbd3/1/51712/state"]),
        "1\n"
    );
    // Permissions: stored verbatim, inherited by new children, shown by ls -p.
    xs.ok("xenstore-chmod", &["/vm/a", "n0", "r5"]);
    xs.ok("xenstore-write", &["/vm/a/new", "v"]);
    let listing = xs.ok("xenstore-ls", &["-p", "/vm/a"]);
    assert!(listing.contains("(n0,r5)"), "{listing}");
    let new_line = listing.lines().find(|l| l.starts_with("new")).unwrap();
    assert!(new_line.ends_with("(n0,r5)"), "{new_line}");
    let b_line = listing.lines().find(|l| l.starts_with("b ")).unwrap();
    assert!(
        b_line.ends_with("(n0)"),
        "created before the chmod: {b_line}"
    );
    // The whole tree as xenstore-ls sees it.
    let tree = xs.ok("xenstore-ls", &["/vm"]);
    assert_eq!(
        tree,
        "a = \"\"\n b = \"\"\n  c = \"value one\"\n new = \"v\"\nx = \"2\"\n"
    );
    // rm removes a subtree; a missing node under an existing parent is fine, under a missing
    // parent it is ENOENT; the root cannot go.
    xs.ok("xenstore-rm", &["/vm/a"]);
    assert!(!xs.tool("xenstore-exists", &["/vm/a/b/c"]).status.success());
    xs.ok("xenstore-rm", &["/vm/a"]);
    assert!(!xs.tool("xenstore-rm", &["/vm/a/b/c"]).status.success());
    assert!(!xs.tool("xenstore-rm", &["/"]).status.success());
    assert_eq!(xs.ok("xenstore-list", &["/vm"]), "x\n");
}

#[test]
fn stock_watch_fires_at_once_on_changes_and_inside_removed_subtrees() {
    let xs = Xenstored::start();
    let client = xs.client();
    let watch = xs.watch("/w");
    watch.expect("/w"); // at once, although /w does not exist
    client.write(0, "/w/a", "1").unwrap();
    watch.expect("/w/a");
    client.write(0, "/elsewhere", "1").unwrap();
    client.write(0, "/wx", "1").unwrap(); // a sibling with the same prefix is not below /w
    watch.expect_quiet();
    client
        .set_perms(0, "/w/a", &["n0".into(), "r1".into()])
        .unwrap();
    watch.expect("/w/a");
    // A watch inside a removed subtree fires with its own path.
    let deep = xs.watch("/w/a/deep/er");
    deep.expect("/w/a/deep/er");
    xs.ok("xenstore-rm", &["/w"]);
    watch.expect("/w");
    deep.expect("/w/a/deep/er");
    // Relative watches get relative event paths.
    let relative = xs.watch("device/vbd");
    relative.expect("device/vbd");
    client
        .write(0, "/local/domain/0/device/vbd/768/state", "3")
        .unwrap();
    relative.expect("device/vbd/768/state");
    // Transactions fire at commit only.
    let tx = client.transaction_start().unwrap();
    client.write(tx, "/w/t", "x").unwrap();
    watch.expect_quiet();
    assert!(client.transaction_end(tx, true).unwrap());
    watch.expect("/w/t");
    // The special paths fire once, at registration.
    let special = xs.watch("@releaseDomain");
    special.expect("@releaseDomain");
    client.write(0, "/w/u", "x").unwrap();
    special.expect_quiet();
}

const PYXS_SCRIPT: &str = r#"
import sys
from pyxs import Client, PyXSError
with Client(unix_socket_path=sys.argv[1]) as c:
    c.write(b"/py/a/b", b"v1")
    print("read", c.read(b"/py/a/b").decode(), c.read(b"/py/a").decode() == "")
    print("ls", ",".join(x.decode() for x in c.list(b"/py/a")))
    print("perms", ",".join(x.decode() for x in c.get_perms(b"/py/a/b")))
    c.set_perms(b"/py/a/b", [b"b0", b"r3", b"w4"])
    print("perms", ",".join(x.decode() for x in c.get_perms(b"/py/a/b")))
    c.mkdir(b"/py/dir")
    c.mkdir(b"/py/a")
    print("mkdir", c.exists(b"/py/dir"), c.read(b"/py/a/b").decode())
    c.delete(b"/py/dir")
    print("exists", c.exists(b"/py/dir"))
    try:
        c.read(b"/py/none")
    except PyXSError as e:
        print("enoent", e.args[0])
    try:
        c.delete(b"/py/none/deeper")
    except PyXSError as e:
        print("rm-enoent", e.args[0])
    print("domain", c.get_domain_path(7).decode())
    c.write(b"rel", b"r")
    print("rel", c.read(b"/local/domain/0/rel").decode())
    m = c.monitor()
    m.watch(b"/py/w", b"tok")
    events = m.wait()
    print("event", *(x.decode() for x in next(events)))
    c.write(b"/py/w/x", b"1")
    print("event", *(x.decode() for x in next(events)))
    c.transaction()
    c.write(b"/py/tx", b"in-tx")
    print("in-tx", c.read(b"/py/tx").decode())
    print("commit", c.commit())
    print("event-after-commit", c.read(b"/py/tx").decode())
    c.transaction()
    c.write(b"/py/rolled", b"x")
    c.rollback()
    print("rolled-back", c.exists(b"/py/rolled"))
"#;

#[test]
fn pyxs_drives_every_operation() {
    let xs = Xenstored::start();
    let out = xs.pyxs(PYXS_SCRIPT);
    let expected = "read v1 True\n\
                    ls b\n\
                    perms n0\n\
                    perms b0,r3,w4\n\
                    mkdir True v1\n\
                    exists False\n\
                    enoent 2\n\
                    rm-enoent 2\n\
                    domain /local/domain/7\n\
                    rel r\n\
                    event /py/w tok\n\
                    event /py/w/x tok\n\
                    in-tx in-tx\n\
                    commit True\n\
                    event-after-commit in-tx\n\
                    rolled-back False\n";
    assert_eq!(out, expected);
    // And our client sees what pyxs left.
    let client = xs.client();
    assert_eq!(client.get_perms(0, "/py/a/b").unwrap(), ["b0", "r3", "w4"]);
    assert_eq!(client.read(0, "rel").unwrap(), "r");
}

#[test]
fn pyxs_transaction_conflicts_with_our_client_then_retries() {
    let xs = Xenstored::start();
    let client = xs.client();
    client.write(0, "/c/counter", "1").unwrap();
    // pyxs reads in a transaction, says so, waits until we changed the node, then commits:
    // EAGAIN (commit() is False), and its retry commits.
    let script = r#"
import sys
from pyxs import Client
with Client(unix_socket_path=sys.argv[1]) as c:
    c.transaction()
    v = int(c.read(b"/c/counter"))
    c.write(b"/c/in-tx", b"1")
    print("ready", flush=True)
    sys.stdin.readline()
    c.write(b"/c/counter", str(v + 10).encode())
    print("first", c.commit())
    c.transaction()
    v = int(c.read(b"/c/counter"))
    c.write(b"/c/counter", str(v + 10).encode())
    print("second", c.commit())
"#;
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .arg(xs.socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n", "pyxs did not start its transaction");
    assert_eq!(
        client.read_opt(0, "/c/in-tx").unwrap(),
        None,
        "not before commit"
    );
    client.write(0, "/c/counter", "5").unwrap();
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    assert!(child.wait().unwrap().success(), "{out}");
    assert_eq!(out, "first False\nsecond True\n");
    assert_eq!(client.read(0, "/c/counter").unwrap(), "15");
    assert_eq!(
        client.read_opt(0, "/c/in-tx").unwrap(),
        None,
        "lost with the conflict"
    );
}

#[test]
fn long_listings_go_through_directory_part() {
    let xs = Xenstored::start();
    let client = xs.client();
    // 300 names of 40 bytes: 12,300 bytes of listing, three DIRECTORY_PART replies.
    let names: Vec<String> = (0..300).map(|i| format!("{i:040}")).collect();
    client
        .transaction(|tx| {
            for name in &names {
                client.write(tx, &format!("/big/{name}"), "x")?;
            }
            Ok(())
        })
        .unwrap();
    let mut expected = names.clone();
    expected.sort();
    // libxenstore gets E2BIG for DIRECTORY and falls back to DIRECTORY_PART.
    let listed = xs.ok("xenstore-list", &["/big"]);
    assert_eq!(listed.lines().collect::<Vec<_>>(), expected);
    assert_eq!(client.directory(0, "/big").unwrap(), expected);
}

#[test]
fn our_client_and_the_stock_tools_agree() {
    let xs = Xenstored::start();
    let client = xs.client();
    client.write(0, "/agree/from-us", "hello world").unwrap();
    client.mkdir(0, "/agree/empty").unwrap();
    assert_eq!(xs.ok("xenstore-read", &["/agree/from-us"]), "hello world\n");
    assert_eq!(xs.ok("xenstore-list", &["/agree"]), "empty\nfrom-us\n");
    xs.ok("xenstore-write", &["/agree/from-tool", "42"]);
    xs.ok("xenstore-chmod", &["/agree/from-tool", "n1", "r0"]);
    assert_eq!(client.read(0, "/agree/from-tool").unwrap(), "42");
    assert_eq!(
        client.get_perms(0, "/agree/from-tool").unwrap(),
        ["n1", "r0"]
    );
    assert_eq!(
        client.directory(0, "/agree").unwrap(),
        ["empty", "from-tool", "from-us"]
    );
    let err = client.read(0, "/agree/none").unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(client.read_opt(0, "/agree/none").unwrap(), None);
    client.rm(0, "/agree").unwrap();
    assert!(!xs.tool("xenstore-exists", &["/agree"]).status.success());
    // A watch of ours sees the tools' writes.
    client.watch("/agree", "t1").unwrap();
    assert_eq!(next(&client), event("/agree", "t1"));
    xs.ok("xenstore-write", &["/agree/x", "1"]);
    assert_eq!(next(&client), event("/agree/x", "t1"));
    xs.ok("xenstore-rm", &["/agree"]);
    assert_eq!(next(&client), event("/agree", "t1"));
}

#[test]
fn client_watches() {
    let xs = Xenstored::start();
    let watcher = xs.client();
    let writer = xs.client();
    watcher.watch("backend/vbd3", "be").unwrap();
    watcher.watch("/local/domain/1/device", "fe").unwrap();
    watcher.watch("@introduceDomain", "intro").unwrap();
    assert_eq!(next(&watcher), event("backend/vbd3", "be"));
    assert_eq!(next(&watcher), event("/local/domain/1/device", "fe"));
    assert_eq!(next(&watcher), event("@introduceDomain", "intro"));
    writer
        .write(0, "/local/domain/0/backend/vbd3/1/768/state", "2")
        .unwrap();
    assert_eq!(next(&watcher), event("backend/vbd3/1/768/state", "be"));
    writer
        .write(0, "/local/domain/1/device/vbd/768/state", "3")
        .unwrap();
    assert_eq!(
        next(&watcher),
        event("/local/domain/1/device/vbd/768/state", "fe")
    );
    // The same path watched twice with one token: EEXIST; unwatching stops the events.
    assert!(watcher.watch("backend/vbd3", "be").is_err());
    watcher.unwatch("backend/vbd3", "be").unwrap();
    assert!(watcher
        .unwatch("backend/vbd3", "be")
        .unwrap_err()
        .is_not_found());
    writer.write(0, "backend/vbd3/1/768/state", "4").unwrap();
    quiet(&watcher);
    // Removing /local/domain/1 fires the watch inside it, with its own path.
    writer.rm(0, "/local/domain/1").unwrap();
    assert_eq!(next(&watcher), event("/local/domain/1/device", "fe"));
    quiet(&watcher);
}

#[test]
fn transactions_between_two_clients() {
    let xs = Xenstored::start();
    let a = xs.client();
    let b = xs.client();
    a.write(0, "/t/x", "0").unwrap();
    a.write(0, "/t/y", "0").unwrap();

    // Read conflict: a reads /t/x, b writes it, a's commit is EAGAIN and changes nothing.
    let tx = a.transaction_start().unwrap();
    assert_eq!(a.read(tx, "/t/x").unwrap(), "0");
    a.write(tx, "/t/y", "from a").unwrap();
    assert_eq!(a.read(tx, "/t/y").unwrap(), "from a", "own writes are seen");
    assert_eq!(b.read(0, "/t/y").unwrap(), "0", "not visible before commit");
    b.write(0, "/t/x", "1").unwrap();
    assert!(!a.transaction_end(tx, true).unwrap());
    assert_eq!(b.read(0, "/t/y").unwrap(), "0");

    // The snapshot: b's change after the start is not seen inside the transaction.
    let tx = a.transaction_start().unwrap();
    b.write(0, "/t/x", "2").unwrap();
    assert_eq!(a.read(tx, "/t/x").unwrap(), "1");
    assert!(!a.transaction_end(tx, true).unwrap());

    // Listing conflict: a lists /t, b adds a child.
    let tx = a.transaction_start().unwrap();
    assert_eq!(a.directory(tx, "/t").unwrap(), ["x", "y"]);
    b.write(0, "/t/z", "new").unwrap();
    assert!(!a.transaction_end(tx, true).unwrap());

    // Removal conflict: a removes /t, b writes below it.
    let tx = a.transaction_start().unwrap();
    a.rm(tx, "/t").unwrap();
    assert!(a.read(tx, "/t/x").unwrap_err().is_not_found());
    b.write(0, "/t/z", "changed").unwrap();
    assert!(!a.transaction_end(tx, true).unwrap());
    assert_eq!(b.read(0, "/t/z").unwrap(), "changed");

    // A read of a missing node conflicts with its creation.
    let tx = a.transaction_start().unwrap();
    assert_eq!(a.read_opt(tx, "/t/late").unwrap(), None);
    b.write(0, "/t/late", "1").unwrap();
    assert!(!a.transaction_end(tx, true).unwrap());

    // No conflict when b touches only what a never accessed.
    let tx = a.transaction_start().unwrap();
    assert_eq!(a.read(tx, "/t/x").unwrap(), "2");
    a.write(tx, "/t/x", "3").unwrap();
    b.write(0, "/other", "1").unwrap();
    assert!(a.transaction_end(tx, true).unwrap());
    assert_eq!(b.read(0, "/t/x").unwrap(), "3");

    // Abort discards; an unknown or foreign transaction id is ENOENT.
    let tx = a.transaction_start().unwrap();
    a.write(tx, "/t/aborted", "1").unwrap();
    assert!(a.transaction_end(tx, false).unwrap());
    assert_eq!(b.read_opt(0, "/t/aborted").unwrap(), None);
    let tx = a.transaction_start().unwrap();
    assert!(b.read(tx, "/t/x").unwrap_err().is_not_found());
    assert!(a.transaction_end(tx, false).unwrap());
    assert!(a.transaction_end(tx, true).unwrap_err().is_not_found());

    // transaction(): the body runs again after a conflict and then commits.
    let mut runs = 0;
    let value = a
        .transaction(|tx| {
            runs += 1;
            let x: u32 = a.read(tx, "/t/x")?.parse().unwrap();
            if runs == 1 {
                b.write(0, "/t/x", "10").unwrap();
            }
            a.write(tx, "/t/x", &(x + 1).to_string())?;
            Ok(x + 1)
        })
        .unwrap();
    assert_eq!((runs, value), (2, 11));
    assert_eq!(b.read(0, "/t/x").unwrap(), "11");
}

#[test]
fn concurrent_increments_through_transactions_lose_nothing() {
    let xs = Xenstored::start();
    let clients: Vec<Arc<Client>> = (0..2).map(|_| Arc::new(xs.client())).collect();
    clients[0].write(0, "/count", "0").unwrap();
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let client = Arc::clone(&clients[i % 2]);
            thread::spawn(move || {
                for _ in 0..40 {
                    client
                        .transaction(|tx| {
                            let n: u64 = client.read(tx, "/count")?.parse().unwrap();
                            client.write(tx, "/count", &(n + 1).to_string())
                        })
                        .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(clients[1].read(0, "/count").unwrap(), "240");
    assert_eq!(xs.ok("xenstore-read", &["/count"]), "240\n");
}

#[test]
fn one_client_many_threads_many_requests_in_flight() {
    let xs = Xenstored::start();
    let client = Arc::new(xs.client());
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let client = Arc::clone(&client);
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                barrier.wait();
                for i in 0..150 {
                    let path = format!("/mt/{t}/{}", i % 10);
                    let value = format!("{t}-{i}");
                    client.write(0, &path, &value).unwrap();
                    assert_eq!(client.read(0, &path).unwrap(), value);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for t in 0..8 {
        assert_eq!(client.directory(0, &format!("/mt/{t}")).unwrap().len(), 10);
        assert_eq!(
            xs.ok("xenstore-read", &[&format!("/mt/{t}/9")]),
            format!("{t}-149\n")
        );
    }
}

#[test]
fn a_dead_server_fails_requests_and_waits_never_hang() {
    // A server that reads one request and dies without answering.
    let dir = tempfile::Builder::new()
        .prefix("xs")
        .tempdir_in("/dev/shm")
        .unwrap();
    let socket = dir.path().join("mute");
    let listener = UnixListener::bind(&socket).unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut header = [0u8; 16];
        stream.read_exact(&mut header).unwrap();
        thread::sleep(Duration::from_millis(200));
    });
    let client = Client::connect(&socket).unwrap();
    let started = Instant::now();
    let err = client.read(0, "/anything").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains("connection"), "{err}");
    server.join().unwrap();
    assert!(client.write(0, "/x", "y").is_err());
    assert!(client.next_event(None).is_err());

    // The real server killed while threads wait for events and issue requests.
    let mut xs = Xenstored::start();
    let client = Arc::new(xs.client());
    client.watch("/k", "k").unwrap();
    assert_eq!(next(&client), event("/k", "k"));
    // Waits for events until the connection dies (taking what the writer fired before).
    let waiter = {
        let client = Arc::clone(&client);
        thread::spawn(move || loop {
            if let Err(err) = client.next_event(None) {
                return err;
            }
        })
    };
    let busy = {
        let client = Arc::clone(&client);
        thread::spawn(move || loop {
            if let Err(err) = client.write(0, "/k/v", "1") {
                return err;
            }
        })
    };
    thread::sleep(Duration::from_millis(100));
    let killed = Instant::now();
    xs.kill();
    let waited = waiter.join().unwrap();
    let busy_err = busy.join().unwrap();
    assert!(killed.elapsed() < Duration::from_secs(5));
    assert!(waited.to_string().contains("connection"), "{waited}");
    assert!(busy_err.to_string().contains("xenstore"), "{busy_err}");
    assert!(client.read(0, "/k").is_err());
}

/// A raw connection for protocol violations.
fn raw_request(stream: &mut UnixStream, msg_type: u32, req_id: u32, payload: &[u8]) {
    let header = Header {
        msg_type,
        req_id,
        tx_id: 0,
        len: payload.len() as u32,
    };
    stream.write_all(&header.encode()).unwrap();
    stream.write_all(payload).unwrap();
}

fn raw_reply(stream: &mut UnixStream) -> (Header, Vec<u8>) {
    let message = wire::read_message(stream).unwrap();
    (message.header, message.payload)
}

#[test]
fn hostile_requests_get_errors_and_oversized_ones_the_door() {
    let xs = Xenstored::start();
    let mut raw = UnixStream::connect(xs.socket()).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let cases: &[(u32, &[u8], &[u8])] = &[
        (99, b"", b"ENOSYS\0"),
        (MsgType::Introduce as u32, b"1\0", b"ENOSYS\0"),
        (MsgType::Read as u32, b"/no-nul", b"EINVAL\0"),
        (MsgType::Read as u32, b"/bad path\0", b"EINVAL\0"),
        (MsgType::Read as u32, b"/trailing/\0", b"EINVAL\0"),
        (MsgType::Write as u32, b"/no-value-separator", b"EINVAL\0"),
        (MsgType::Rm as u32, b"/\0", b"EINVAL\0"),
        (MsgType::SetPerms as u32, b"/\0bogus\0", b"EINVAL\0"),
        (MsgType::Watch as u32, b"@nonsense\0t\0", b"EINVAL\0"),
        (MsgType::TransactionEnd as u32, b"T\0", b"ENOENT\0"),
        (MsgType::WatchEvent as u32, b"/a\0t\0", b"EINVAL\0"),
    ];
    for (i, (msg_type, payload, answer)) in cases.iter().enumerate() {
        let req_id = 1000 + i as u32;
        raw_request(&mut raw, *msg_type, req_id, payload);
        let (header, reply) = raw_reply(&mut raw);
        assert_eq!(header.req_id, req_id);
        assert_eq!(header.msg_type, MsgType::Error as u32, "case {i}");
        assert_eq!(reply, *answer, "case {i}");
    }
    // GET_DOMAIN_PATH and DIRECTORY_PART past the end, as xenstored answers them.
    raw_request(&mut raw, MsgType::GetDomainPath as u32, 1, b"5\0");
    assert_eq!(raw_reply(&mut raw).1, b"/local/domain/5\0");
    raw_request(
        &mut raw,
        MsgType::DirectoryPart as u32,
        2,
        b"/\x00100000\x00",
    );
    let part = raw_reply(&mut raw).1;
    assert!(
        part.ends_with(b"\0\0") && part[0].is_ascii_digit(),
        "{part:?}"
    );

    // A transaction may not grow without bound.
    let client = xs.client();
    let tx = client.transaction_start().unwrap();
    let mut refused = None;
    for i in 0..2000 {
        if let Err(err) = client.write(tx, &format!("/quota/{i}"), "x") {
            refused = Some((i, err));
            break;
        }
    }
    let (at, err) = refused.expect("an unbounded transaction");
    assert_eq!(at, 1024);
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(client.transaction_end(tx, false).unwrap());

    // A payload beyond 4096 bytes closes that connection, and only that one.
    let header = Header {
        msg_type: MsgType::Write as u32,
        req_id: 9,
        tx_id: 0,
        len: 4097,
    };
    raw.write_all(&header.encode()).unwrap();
    let mut rest = Vec::new();
    assert_eq!(raw.read_to_end(&mut rest).unwrap(), 0, "connection closed");
    client.write(0, "/still", "up").unwrap();
    assert_eq!(xs.ok("xenstore-read", &["/still"]), "up\n");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_kept() {
    let mut xs = Xenstored::start();
    xs.client().write(0, "/before", "1").unwrap();
    // A second server on a live socket refuses to start.
    let second = Command::new(env!("CARGO_BIN_EXE_ferrotap"))
        .args(["xensim", "xenstored"])
        .arg(xs.dir.path())
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already listening"));
    xs.client().read(0, "/before").unwrap();
    // Killed, its socket file stays; a new server replaces it (with a fresh tree).
    xs.kill();
    assert!(xs.socket().exists());
    xs.child = spawn_server(xs.dir.path());
    let client = xs.client();
    assert_eq!(client.read_opt(0, "/before").unwrap(), None);
    assert_eq!(client.directory(0, "/local/domain").unwrap(), ["0"]);
}

/// Run in a child process (the environment is per process): `Client::open_default` follows
/// `$XENSTORED_PATH` as libxenstore does.
#[test]
fn open_default_follows_xenstored_path() {
    if let Some(expected) = std::env::var_os("XS_TEST_OPEN_DEFAULT_EXPECT") {
        let client = Client::open_default().unwrap();
        assert_eq!(
            client.read(0, "/marker").unwrap(),
            expected.to_str().unwrap()
        );
        return;
    }
    let xs = Xenstored::start();
    xs.client().write(0, "/marker", "found").unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "open_default_follows_xenstored_path",
            "--nocapture",
        ])
        .env("XENSTORED_PATH", xs.socket())
        .env("XS_TEST_OPEN_DEFAULT_EXPECT", "found")
        .output()
        .unwrap();
    assert!(
        child.status.success(),
        "{}{}",
        String::from_utf8_lossy(&child.stdout),
        String::from_utf8_lossy(&child.stderr)
    );
    let stdout = String::from_utf8_lossy(&child.stdout);
    assert!(stdout.contains("1 passed"), "{stdout}");
}
