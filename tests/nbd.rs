//! `ferrotap nbd` against the standard NBD clients as oracles (qemu-img, qemu-io, nbdinfo,
//! nbdcopy, fio's nbd engine), and against a hostile client written here with raw sockets.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{create_vhd, open_ro, run_ok};
use ferrotap::nbd::proto::*;
use tempfile::TempDir;

const MIB: u64 = 1024 * 1024;

/// A running `ferrotap nbd`, killed on drop.
struct Server {
    child: Child,
    uri: String,
    socket: PathBuf,
}

impl Server {
    /// Serve `image` on a unix socket in `dir`, with extra arguments.
    fn start(dir: &Path, image: &Path, extra: &[&str]) -> Server {
        let socket = dir.join(format!(
            "nbd-{}.sock",
            image.file_name().unwrap().to_string_lossy()
        ));
        let mut args: Vec<String> = vec!["nbd".into(), "--socket".into()];
        args.push(socket.to_string_lossy().into_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(image.to_string_lossy().into_owned());
        Server::spawn(&args, socket)
    }

    fn spawn(args: &[String], socket: PathBuf) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotap"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // The server prints its URI once it listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(!line.is_empty(), "ferrotap nbd {args:?} printed no URI");
        Server {
            child,
            uri: line.trim().to_string(),
            socket,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stop the server (its writes are in the file: no cache of its own).
    fn stop(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout_of(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).unwrap()
}

fn qemu_img(args: &[&str]) -> String {
    stdout_of(Command::new("qemu-img").args(args))
}

fn qemu_io(format: &str, target: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", format]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(target);
    let out = stdout_of(&mut cmd);
    // qemu-io reports failed commands on stdout and still exits 0.
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {commands:?} on {target}: {out}"
    );
    out
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Merge touching ranges.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, len) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= start => {
                last.1 = last.1.max(start + len - last.0);
            }
            _ => out.push((start, len)),
        }
    }
    out
}

/// The data (not hole) ranges `nbdinfo --map` reports for base:allocation.
fn nbdinfo_data(uri: &str) -> Vec<(u64, u64)> {
    let out = stdout_of(Command::new("nbdinfo").args(["--map", uri]));
    let mut data = Vec::new();
    let mut covered = 0;
    for line in out.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (start, len, kind): (u64, u64, u32) = (
            fields[0].parse().unwrap(),
            fields[1].parse().unwrap(),
            fields[2].parse().unwrap(),
        );
        assert_eq!(start, covered, "nbdinfo --map has a gap: {out}");
        covered = start + len;
        if kind & STATE_HOLE == 0 {
            data.push((start, len));
        }
    }
    merged(data)
}

/// The ranges `qemu-img map` says hold data, through the whole chain.
fn qemu_map_data(target: &str) -> Vec<(u64, u64)> {
    let out = qemu_img(&["map", "--output=json", target]);
    let entries: serde_json::Value = serde_json::from_str(&out).unwrap();
    merged(
        entries
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"].as_bool().unwrap())
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect(),
    )
}

/// The ranges the chain itself says hold data (what block status must report).
fn chain_data(path: &Path) -> Vec<(u64, u64)> {
    let image = open_ro(path);
    let mut data = Vec::new();
    let mut offset = 0;
    while offset < image.virtual_size() {
        let status = image
            .block_status(offset, image.virtual_size() - offset)
            .unwrap();
        if !status.zero {
            data.push((offset, status.len));
        }
        offset += status.len;
    }
    merged(data)
}

#[test]
fn raw_export_takes_qemu_io_patterns_and_qemu_img_reads_them() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("disk.raw");
    qemu_img(&["create", "-f", "raw", p(&image), "64M"]);
    let server = Server::start(dir.path(), &image, &[]);
    let uri = server.uri.clone();

    let info = qemu_img(&["info", "--output=json", &uri]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"].as_u64(), Some(64 * MIB));

    // Aligned, unaligned and FUA writes, then read back with the same patterns.
    qemu_io(
        "raw",
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 5000000 12345",
            "write -f -P 0x5a 33M 64k",
            "write -P 0x17 40M 3M",
            "write -z 40M 1M",
            "write -z -u 41M 1M",
            "write -z -u -n 42M 1M",
            "flush",
        ],
    );
    qemu_io(
        "raw",
        &uri,
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 5000000 12345",
            "read -P 0x5a 33M 64k",
            "read -P 0 40M 3M",
            "read -P 0 63M 1M",
        ],
    );
    // The bytes landed in the file, where qemu reads them without ferrotap.
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(bytes[5_000_000..5_012_345].iter().all(|&b| b == 0xcd));
    assert_eq!(bytes[4_999_999], 0);
    assert_eq!(bytes[5_012_345], 0);
    assert!(bytes[33 * MIB as usize..(33 * MIB + 65536) as usize]
        .iter()
        .all(|&b| b == 0x5a));
    let compare = qemu_img(&["compare", "-f", "raw", "-F", "raw", p(&image), &uri]);
    assert!(compare.contains("identical"), "{compare}");
    // Block status over NBD equals qemu's own map of the file (holes by SEEK_HOLE).
    assert_eq!(nbdinfo_data(&uri), qemu_map_data(p(&image)));
    assert_eq!(qemu_map_data(&uri), qemu_map_data(p(&image)));
}

/// A qcow2 on a qcow2 backing file with data written by qemu-io in known places: block
/// status over NBD shows data exactly there, and the content equals qemu's reading.
#[test]
fn qcow2_chain_block_status_matches_the_chain_allocation() {
    let dir = TempDir::new().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&base), "64M"]);
    qemu_io(
        "qcow2",
        p(&base),
        &["write -P 0x11 0 1M", "write -P 0x22 20M 128k"],
    );
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    qemu_io(
        "qcow2",
        p(&top),
        &[
            "write -P 0x33 512k 1M",
            "write -P 0x44 40M 64k",
            "write -z 20M 64k",
        ],
    );
    let server = Server::start(dir.path(), &top, &[]);
    let uri = server.uri.clone();

    // Data: base 0-1M and 20M+64k..20M+128k (20M..20M+64k is zeroed in top), top
    // 512k-1.5M and 40M..40M+64k.
    let expected = vec![
        (0, 1536 * 1024),
        (20 * MIB + 65536, 65536),
        (40 * MIB, 65536),
    ];
    assert_eq!(nbdinfo_data(&uri), expected);
    assert_eq!(qemu_map_data(p(&top)), expected);
    assert_eq!(chain_data(&top), expected);
    assert_eq!(qemu_map_data(&uri), expected);

    let compare = qemu_img(&["compare", "-F", "raw", p(&top), &uri]);
    assert!(compare.contains("identical"), "{compare}");
    // nbdinfo --content reads the first sectors: data, not zeros.
    let content = stdout_of(Command::new("nbdinfo").args(["--content", &uri]));
    assert!(!content.trim().is_empty());
    assert!(!content.contains("empty"), "{content}");
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &uri]));
    assert!(list.contains("export=\"\""), "{list}");
    assert!(list.contains("base:allocation"), "{list}");
    assert!(list.contains("can_multi_conn: true"), "{list}");

    // Writes through NBD copy up into the top; zeroes (with and without unmap) hide the
    // base; the base is untouched.
    let base_before = std::fs::read(&base).unwrap();
    qemu_io(
        "raw",
        &uri,
        &[
            "write -P 0x55 20M 4k",
            "write -P 0x66 1000k 100k",
            "write -z -u 128k 64k",
            "write -z 256k 4k",
        ],
    );
    qemu_io("raw", &uri, &["read -P 0 128k 64k", "read -P 0 256k 4k"]);
    server.stop();
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
    qemu_io(
        "qcow2",
        p(&top),
        &[
            "read -P 0x55 20M 4k",
            "read -P 0 20975616 60k",
            "read -P 0x22 21037056 64k",
            "read -P 0x33 512k 488k",
            "read -P 0x66 1000k 100k",
            "read -P 0x33 1100k 436k",
            "read -P 0x11 0 128k",
            "read -P 0 128k 64k",
            "read -P 0x11 192k 64k",
            "read -P 0 256k 4k",
            "read -P 0x11 260k 252k",
        ],
    );
    run_ok(Command::new("qemu-img").args(["check", p(&top)]));
}

/// A VHD differencing disk on a dynamic parent: the chain's allocation over NBD, writes
/// land in the child only.
#[test]
fn vhd_differencing_export() {
    let dir = TempDir::new().unwrap();
    let parent = dir.path().join("parent.vhd");
    let child = dir.path().join("child.vhd");
    // The parent is qemu's own VHD; the child is ferrotap's (qemu cannot create one).
    qemu_img(&[
        "create",
        "-f",
        "vpc",
        "-o",
        "subformat=dynamic,force_size=on",
        p(&parent),
        "32M",
    ]);
    qemu_io(
        "vpc",
        p(&parent),
        &["write -P 0x77 0 1M", "write -P 0x78 8M 2M"],
    );
    create_vhd(&child, 32 * MIB, &[], Some(&parent));
    let parent_before = std::fs::read(&parent).unwrap();
    let server = Server::start(dir.path(), &child, &[]);
    let uri = server.uri.clone();

    qemu_io(
        "raw",
        &uri,
        &["write -P 0x99 4M 4k", "write -P 0x9a 8389120 512"],
    );
    qemu_io(
        "raw",
        &uri,
        &[
            "read -P 0x77 0 1M",
            "read -P 0 1M 3M",
            "read -P 0x99 4M 4k",
            "read -P 0x78 8M 512",
            "read -P 0x9a 8389120 512",
            "read -P 0x78 8389632 2047k",
        ],
    );
    assert_eq!(nbdinfo_data(&uri), chain_data(&child));
    let data = nbdinfo_data(&uri);
    for needed in [(0, MIB), (4 * MIB, 4096), (8 * MIB, 2 * MIB)] {
        assert!(
            data.iter()
                .any(|&(s, l)| s <= needed.0 && needed.0 + needed.1 <= s + l),
            "{needed:?} not data in {data:?}"
        );
    }
    // Every byte over NBD equals what qemu reads from the chain flattened by ferrotap img.
    let flat = dir.path().join("flat.raw");
    run_ok(Command::new(env!("CARGO_BIN_EXE_ferrotap")).args([
        "img",
        "convert",
        "-O",
        "raw",
        p(&child),
        p(&flat),
    ]));
    let compare = qemu_img(&["compare", "-f", "raw", "-F", "raw", p(&flat), &uri]);
    assert!(compare.contains("identical"), "{compare}");
    server.stop();
    assert_eq!(std::fs::read(&parent).unwrap(), parent_before);
    // qemu reads the child's own block (it does not follow VHD parents) with the bytes
    // written over NBD.
    qemu_io("vpc", p(&child), &["read -P 0x99 4M 4k"]);
}

#[test]
fn nbdcopy_and_qemu_img_convert_out_and_in() {
    let dir = TempDir::new().unwrap();
    let source = dir.path().join("source.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&source), "48M"]);
    qemu_io(
        "qcow2",
        p(&source),
        &[
            "write -P 0x61 0 3M",
            "write -P 0x62 17829888 200k",
            "write -P 0x63 47M 1M",
        ],
    );
    let expected = dir.path().join("expected.raw");
    qemu_img(&["convert", "-O", "raw", p(&source), p(&expected)]);
    let server = Server::start(dir.path(), &source, &["--read-only"]);

    // Out: nbdcopy and qemu-img convert read the export; cmp against qemu's conversion.
    let copied = dir.path().join("copied.raw");
    run_ok(Command::new("nbdcopy").args([&server.uri, p(&copied)]));
    run_ok(Command::new("cmp").args([p(&expected), p(&copied)]));
    let converted = dir.path().join("converted.qcow2");
    qemu_img(&["convert", "-O", "qcow2", &server.uri, p(&converted)]);
    let compare = qemu_img(&["compare", p(&expected), p(&converted)]);
    assert!(compare.contains("identical"), "{compare}");
    // The read-only export refuses writes.
    let refused = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &server.uri])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() || text.contains("failed") || text.contains("read-only"),
        "{text}"
    );
    server.stop();

    // In: nbdcopy writes a random file into an empty qcow2 export, then qemu-img convert
    // writes another qcow2 into a raw export (-n: the export exists).
    let random = dir.path().join("random.raw");
    let mut bytes = vec![0u8; 48 * MIB as usize];
    let mut x = 0x9e3779b97f4a7c15u64;
    for chunk in bytes.chunks_mut(8).step_by(3) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    bytes[10 * MIB as usize..20 * MIB as usize].fill(0);
    std::fs::write(&random, &bytes).unwrap();
    let target = dir.path().join("target.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&target), "48M"]);
    let server = Server::start(dir.path(), &target, &[]);
    run_ok(Command::new("nbdcopy").args([p(&random), &server.uri]));
    server.stop();
    let compare = qemu_img(&["compare", "-f", "raw", p(&random), p(&target)]);
    assert!(compare.contains("identical"), "{compare}");
    run_ok(Command::new("qemu-img").args(["check", p(&target)]));

    let raw_target = dir.path().join("target.raw");
    qemu_img(&["create", "-f", "raw", p(&raw_target), "48M"]);
    let server = Server::start(dir.path(), &raw_target, &[]);
    qemu_img(&["convert", "-n", "-O", "raw", p(&source), &server.uri]);
    server.stop();
    run_ok(Command::new("cmp").args([p(&expected), p(&raw_target)]));
}

/// fio's nbd engine (libnbd) writes with verification headers at depth 16 on two
/// connections at once, then reads everything back and checks it: on a disk (O_DIRECT,
/// several threads per connection, small batches) and on tmpfs (buffered, one thread
/// taking batches of up to 32 requests).
#[test]
fn fio_nbd_engine_verifies() {
    fio_verify(TempDir::new().unwrap());
    fio_verify(TempDir::new_in("/dev/shm").unwrap());
}

fn fio_verify(dir: TempDir) {
    let image = dir.path().join("fio.qcow2");
    qemu_img(&["create", "-f", "qcow2", p(&image), "64M"]);
    let server = Server::start(dir.path(), &image, &[]);
    let out = stdout_of(Command::new("fio").args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=2",
        "--size=16M",
        "--offset_increment=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    for job in json["jobs"].as_array().unwrap() {
        assert_eq!(job["error"].as_u64(), Some(0), "{job}");
        assert!(job["write"]["io_bytes"].as_u64().unwrap() >= 16 * MIB);
        assert!(job["read"]["io_bytes"].as_u64().unwrap() >= 16 * MIB);
    }
    server.stop();
    run_ok(Command::new("qemu-img").args(["check", p(&image)]));
}

#[test]
fn tcp_is_loopback_unless_asked() {
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("tcp.raw");
    qemu_img(&["create", "-f", "raw", p(&image), "8M"]);
    let server = Server::spawn(
        &[
            "nbd".into(),
            "--tcp".into(),
            "127.0.0.1:0".into(),
            "--export-name".into(),
            "disk0".into(),
            p(&image).into(),
        ],
        PathBuf::new(),
    );
    assert!(server.uri.starts_with("nbd://127.0.0.1:"), "{}", server.uri);
    qemu_io("raw", &server.uri, &["write -P 0x42 1M 1M"]);
    qemu_io("raw", &server.uri, &["read -P 0x42 1M 1M"]);
    let list = stdout_of(Command::new("nbdinfo").args(["--list", &server.uri]));
    assert!(list.contains("export=\"disk0\""), "{list}");
    drop(server);

    let refused = Command::new(env!("CARGO_BIN_EXE_ferrotap"))
        .args(["nbd", "--tcp", "0.0.0.0:0", p(&image)])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow-remote"));
}

// ---- a client speaking the protocol byte by byte -------------------------------------

struct RawClient {
    stream: UnixStream,
}

struct OptionReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

/// One reply of the transmission phase.
#[derive(Debug)]
struct Reply {
    handle: u64,
    error: u32,
    /// Chunk type for structured replies, `None` for simple ones.
    chunk: Option<u16>,
    payload: Vec<u8>,
}

impl RawClient {
    /// Connect and read the greeting; send no flags yet.
    fn greet(socket: &Path) -> RawClient {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(be_u64(&greeting, 0), NBD_MAGIC);
        assert_eq!(be_u64(&greeting, 8), IHAVEOPT);
        assert_ne!(be_u16(&greeting, 16) & FLAG_FIXED_NEWSTYLE, 0);
        RawClient { stream }
    }

    /// Connect with fixed newstyle and no zeroes.
    fn connect(socket: &Path) -> RawClient {
        let mut client = RawClient::greet(socket);
        client
            .send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        client
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut header = Vec::new();
        header.extend_from_slice(&IHAVEOPT.to_be_bytes());
        header.extend_from_slice(&option.to_be_bytes());
        header.extend_from_slice(&(data.len() as u32).to_be_bytes());
        header.extend_from_slice(data);
        self.send(&header).unwrap();
    }

    fn option_reply(&mut self) -> OptionReply {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header).unwrap();
        assert_eq!(be_u64(&header, 0), OPTION_REPLY_MAGIC);
        let mut data = vec![0u8; be_u32(&header, 16) as usize];
        self.stream.read_exact(&mut data).unwrap();
        OptionReply {
            option: be_u32(&header, 8),
            kind: be_u32(&header, 12),
            data,
        }
    }

    /// True when the server closed the connection (EOF or reset, not a timeout).
    fn closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    /// Negotiate (structured replies and base:allocation when asked) and enter
    /// transmission with NBD_OPT_GO; returns the export size and transmission flags.
    fn go(&mut self, structured: bool) -> (u64, u16) {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.option_reply().kind, REP_ACK);
            let mut query = Vec::new();
            query.extend_from_slice(&0u32.to_be_bytes());
            query.extend_from_slice(&1u32.to_be_bytes());
            query.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
            query.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.option(OPT_SET_META_CONTEXT, &query);
            let context = self.option_reply();
            assert_eq!(context.kind, REP_META_CONTEXT);
            assert_eq!(&context.data[4..], BASE_ALLOCATION.as_bytes());
            assert_eq!(self.option_reply().kind, REP_ACK);
        }
        self.option(OPT_GO, &[0, 0, 0, 0, 0, 0]);
        let mut export = None;
        loop {
            let reply = self.option_reply();
            assert_eq!(reply.option, OPT_GO);
            match reply.kind {
                REP_INFO if be_u16(&reply.data, 0) == INFO_EXPORT => {
                    export = Some((be_u64(&reply.data, 2), be_u16(&reply.data, 10)));
                }
                REP_INFO => {}
                REP_ACK => return export.unwrap(),
                other => panic!("unexpected reply {other:#x} to NBD_OPT_GO"),
            }
        }
    }

    fn request(&mut self, flags: u16, command: u16, handle: u64, offset: u64, len: u32) {
        let request = Request {
            flags,
            command,
            handle,
            offset,
            len,
        };
        self.send(&request.encode()).unwrap();
    }

    /// Read one reply; `read_len` is the data length of a simple read reply (the protocol
    /// leaves that to the client to know).
    fn reply(&mut self, read_len: usize) -> Reply {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic).unwrap();
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.stream.read_exact(&mut rest).unwrap();
                let error = be_u32(&rest, 0);
                let mut payload = vec![0u8; if error == 0 { read_len } else { 0 }];
                self.stream.read_exact(&mut payload).unwrap();
                Reply {
                    handle: be_u64(&rest, 4),
                    error,
                    chunk: None,
                    payload,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; 16];
                self.stream.read_exact(&mut rest).unwrap();
                assert_ne!(be_u16(&rest, 0) & REPLY_FLAG_DONE, 0);
                let kind = be_u16(&rest, 2);
                let mut payload = vec![0u8; be_u32(&rest, 12) as usize];
                self.stream.read_exact(&mut payload).unwrap();
                let error = if kind & 0x8000 != 0 {
                    be_u32(&payload, 0)
                } else {
                    0
                };
                Reply {
                    handle: be_u64(&rest, 4),
                    error,
                    chunk: Some(kind),
                    payload,
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> Reply {
        self.request(0, CMD_WRITE, handle, offset, data.len() as u32);
        self.send(data).unwrap();
        self.reply(0)
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Reply {
        self.request(0, CMD_READ, handle, offset, len);
        self.reply(len as usize)
    }
}

fn raw_image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&["create", "-f", "raw", p(&path), &size.to_string()]);
    path
}

#[test]
fn malformed_handshakes_are_refused_and_the_server_goes_on() {
    let dir = TempDir::new().unwrap();
    let image = raw_image(dir.path(), "hs.raw", 4 * MIB);
    let server = Server::start(dir.path(), &image, &[]);
    let socket = server.socket.clone();

    // Client flags with unknown bits: closed.
    let mut client = RawClient::greet(&socket);
    client.send(&0xffff_fff0u32.to_be_bytes()).unwrap();
    assert!(client.closed());

    // An option sent before the flags: its magic reads as flags with unknown bits.
    let mut client = RawClient::greet(&socket);
    client.option(OPT_GO, &[0, 0, 0, 0, 0, 0]);
    assert!(client.closed());

    // An option without the IHAVEOPT magic: closed.
    let mut client = RawClient::connect(&socket);
    client
        .send(&[0x12, 0x34, 0x56, 0x78, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0])
        .unwrap();
    assert!(client.closed());

    // Unknown options (data skipped) and malformed known ones get errors; the same
    // connection then negotiates normally.
    let mut client = RawClient::connect(&socket);
    client.option(0x4242, b"whatever");
    let reply = client.option_reply();
    assert_eq!((reply.option, reply.kind), (0x4242, REP_ERR_UNSUP));
    client.option(OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(client.option_reply().kind, REP_ERR_INVALID);
    client.option(OPT_GO, &[0, 0, 0, 2, b'n', b'o', 0, 0]);
    assert_eq!(client.option_reply().kind, REP_ERR_UNKNOWN);
    client.option(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(client.option_reply().kind, REP_ERR_INVALID);
    client.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        client.option_reply().kind,
        REP_ERR_INVALID,
        "SET_META_CONTEXT before STRUCTURED_REPLY"
    );
    client.option(OPT_LIST, &[]);
    let server_reply = client.option_reply();
    assert_eq!(server_reply.kind, REP_SERVER);
    assert_eq!(
        be_u32(&server_reply.data, 0),
        0,
        "the default export's name"
    );
    assert_eq!(client.option_reply().kind, REP_ACK);
    let (size, flags) = client.go(true);
    assert_eq!(size, 4 * MIB);
    assert_ne!(flags & TX_CAN_MULTI_CONN, 0);
    assert_eq!(client.read(1, 0, 4096).payload.len(), 8 + 4096);

    // An oversized option length: NBD_REP_ERR_TOO_BIG (or nothing), then closed.
    let mut client = RawClient::connect(&socket);
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&(256 * MIB as u32).to_be_bytes());
    client.send(&header).unwrap();
    assert_eq!(client.option_reply().kind, REP_ERR_TOO_BIG);
    assert!(client.closed());

    // NBD_OPT_EXPORT_NAME for an unknown export: closed; NBD_OPT_ABORT: ACK then closed.
    let mut client = RawClient::connect(&socket);
    client.option(OPT_EXPORT_NAME, b"nope");
    assert!(client.closed());
    let mut client = RawClient::connect(&socket);
    client.option(OPT_ABORT, &[]);
    assert_eq!(client.option_reply().kind, REP_ACK);
    assert!(client.closed());

    // Old-style EXPORT_NAME still works, with simple replies.
    let mut client = RawClient::connect(&socket);
    client.option(OPT_EXPORT_NAME, b"");
    let mut export = [0u8; 10];
    client.stream.read_exact(&mut export).unwrap();
    assert_eq!(be_u64(&export, 0), 4 * MIB);
    let reply = client.read(7, 4096, 512);
    assert_eq!((reply.handle, reply.error, reply.chunk), (7, 0, None));

    let compare = qemu_img(&["compare", "-f", "raw", "-F", "raw", p(&image), &server.uri]);
    assert!(compare.contains("identical"), "{compare}");
}

#[test]
fn bad_requests_get_the_spec_errors() {
    let dir = TempDir::new().unwrap();
    let image = raw_image(dir.path(), "req.raw", 8 * MIB);
    let server = Server::start(dir.path(), &image, &[]);
    let size = 8 * MIB;

    for structured in [false, true] {
        let mut client = RawClient::connect(&server.socket);
        client.go(structured);
        let error = |client: &mut RawClient, flags, command, offset, len| {
            client.request(flags, command, 99, offset, len);
            let reply = client.reply(0);
            assert_eq!(reply.handle, 99);
            if structured {
                assert_eq!(reply.chunk, Some(REPLY_TYPE_ERROR), "{reply:?}");
            }
            reply.error
        };
        // Past the end, and offsets that overflow.
        assert_eq!(error(&mut client, 0, CMD_READ, size, 1), EINVAL);
        assert_eq!(error(&mut client, 0, CMD_READ, size - 512, 1024), EINVAL);
        assert_eq!(error(&mut client, 0, CMD_READ, u64::MAX - 10, 512), EINVAL);
        assert_eq!(error(&mut client, 0, CMD_TRIM, size, 4096), EINVAL);
        assert_eq!(error(&mut client, 0, CMD_WRITE_ZEROES, size - 1, 2), ENOSPC);
        // A read longer than the 32 MiB block size maximum.
        let big = error(&mut client, 0, CMD_READ, 0, 64 * MIB as u32);
        assert!(big == EINVAL || big == EOVERFLOW, "{big}");
        // Unknown commands and flags; flags not allowed for the command.
        assert_eq!(error(&mut client, 0, 99, 0, 0), EINVAL);
        assert_eq!(error(&mut client, 0, 5, 0, 4096), EINVAL, "NBD_CMD_CACHE");
        assert_eq!(error(&mut client, 1 << 9, CMD_READ, 0, 512), EINVAL);
        assert_eq!(
            error(&mut client, CMD_FLAG_NO_HOLE, CMD_READ, 0, 512),
            EINVAL
        );
        // FAST_ZERO that cannot be fast.
        assert_eq!(
            error(
                &mut client,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_WRITE_ZEROES,
                0,
                4096
            ),
            ENOTSUP
        );
        if !structured {
            // Block status needs a negotiated context.
            assert_eq!(error(&mut client, 0, CMD_BLOCK_STATUS, 0, 4096), EINVAL);
        }
        // Zero-length requests do nothing and succeed.
        for command in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            client.request(0, command, 12, 4096, 0);
            let reply = client.reply(0);
            assert_eq!((reply.handle, reply.error), (12, 0), "{command}");
            if structured && command == CMD_READ {
                assert_eq!(reply.chunk, Some(REPLY_TYPE_NONE));
            }
        }
        // A write past the end: its payload is consumed, the error is ENOSPC, and the
        // stream stays in step.
        client.request(0, CMD_WRITE, 5, size - 4096, 8192);
        client.send(&[0xee; 8192]).unwrap();
        let reply = client.reply(0);
        assert_eq!((reply.handle, reply.error), (5, ENOSPC));
        // Still serving: a write and a read back.
        assert_eq!(client.write(6, 4096, &[0x3c; 4096]).error, 0);
        let reply = client.read(8, 4096, 4096);
        let data = if structured {
            assert_eq!(be_u64(&reply.payload, 0), 4096);
            reply.payload[8..].to_vec()
        } else {
            reply.payload
        };
        assert_eq!(data, vec![0x3c; 4096]);
        if structured {
            client.request(0, CMD_BLOCK_STATUS, 11, 0, size as u32);
            let reply = client.reply(0);
            assert_eq!(reply.chunk, Some(REPLY_TYPE_BLOCK_STATUS));
            let covered: u64 = reply.payload[4..]
                .chunks(8)
                .map(|d| u64::from(be_u32(d, 0)))
                .sum();
            assert!(covered > 0 && covered <= size);
        }
        // A write longer than 32 MiB cannot be skipped: hard disconnect.
        client.request(0, CMD_WRITE, 9, 0, 64 * MIB as u32);
        assert!(client.closed());
    }
    // A bad request magic: closed.
    let mut client = RawClient::connect(&server.socket);
    client.go(false);
    client.send(&[0u8; REQUEST_LEN]).unwrap();
    assert!(client.closed());

    // A read-only export refuses writes with EPERM.
    let ro = Server::start(
        dir.path(),
        &raw_image(dir.path(), "ro.raw", MIB),
        &["--read-only"],
    );
    let mut client = RawClient::connect(&ro.socket);
    let (_, flags) = client.go(false);
    assert_ne!(flags & TX_READ_ONLY, 0);
    assert_eq!(client.write(1, 0, &[1; 512]).error, EPERM);
    client.request(0, CMD_TRIM, 2, 0, 512);
    assert_eq!(client.reply(0).error, EPERM);
    assert_eq!(client.read(3, 0, 512).payload, vec![0; 512]);
}

fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Clients that vanish mid-transfer, many connections at once: the others are served,
/// threads go away with their connections and memory stays bounded.
#[test]
fn vanishing_clients_and_many_connections() {
    let dir = TempDir::new().unwrap();
    let image = raw_image(dir.path(), "many.raw", 32 * MIB);
    let server = Server::start(dir.path(), &image, &["--threads", "2"]);
    let pid = server.pid();
    let mut steady = RawClient::connect(&server.socket);
    steady.go(true);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = threads_of(pid);

    // Vanish: mid-payload of a write, with reads unanswered, mid-handshake.
    for round in 0..8u64 {
        let mut client = RawClient::connect(&server.socket);
        client.go(round % 2 == 0);
        client.request(0, CMD_WRITE, 1, 0, MIB as u32);
        client.send(&[0x71; 1000]).unwrap();
        drop(client);
        let mut client = RawClient::connect(&server.socket);
        client.go(false);
        for handle in 0..64 {
            client.request(0, CMD_READ, handle, 0, 65536);
        }
        drop(client);
        let mut client = RawClient::connect(&server.socket);
        client.option(OPT_GO, &[0, 0]);
        drop(client);
    }

    // 16 connections at once, each writing and reading back its own 1 MiB.
    let workers: Vec<_> = (0..16u64)
        .map(|i| {
            let socket = server.socket.clone();
            std::thread::spawn(move || {
                let mut client = RawClient::connect(&socket);
                client.go(i % 2 == 1);
                let pattern = vec![i as u8 + 1; MIB as usize];
                for (n, piece) in pattern.chunks(65536).enumerate() {
                    let reply = client.write(n as u64, i * 2 * MIB + n as u64 * 65536, piece);
                    assert_eq!(reply.error, 0);
                }
                let reply = client.read(100, i * 2 * MIB, MIB as u32);
                let skip = if i % 2 == 1 { 8 } else { 0 };
                assert!(reply.payload[skip..] == pattern[..]);
                client
            })
        })
        .map(|t| t.join().unwrap())
        .collect();
    // 16 connections open at once, each with its threads and buffers: memory bounded.
    let rss = rss_kib(pid);
    assert!(rss < 256 * 1024, "server RSS {rss} KiB with 17 connections");
    drop(workers);

    // The steady connection was never disturbed.
    assert_eq!(steady.write(1, 31 * MIB, &[0x5e; 4096]).error, 0);
    let reply = steady.read(2, 31 * MIB, 4096);
    assert_eq!(&reply.payload[8..], &[0x5e; 4096][..]);
    // The vanished clients' threads are gone.
    let mut threads = threads_of(pid);
    for _ in 0..100 {
        if threads <= baseline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        threads = threads_of(pid);
    }
    assert!(threads <= baseline, "{threads} threads, {baseline} before");
    // A clean disconnect; the data is in the file.
    steady.request(0, CMD_DISC, 3, 0, 0);
    assert!(steady.closed());
    let bytes = std::fs::read(&image).unwrap();
    for i in 0..16usize {
        let start = i * 2 * MIB as usize;
        assert!(bytes[start..start + MIB as usize]
            .iter()
            .all(|&b| b == i as u8 + 1));
    }
    assert!(bytes[31 * MIB as usize..31 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == 0x5e));
}

/// `--fd N`: serve one socket inherited from the parent, as SMAPIv3's import_activate
/// hands it over, then exit when the client hangs up.
#[test]
fn inherited_socket_fd() {
    let dir = TempDir::new().unwrap();
    let image = raw_image(dir.path(), "fd.raw", 4 * MIB);
    let (ours, theirs) = UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    // SAFETY: clears close-on-exec on a descriptor this test owns, so the child inherits it.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotap"))
        .args(["nbd", "--fd", &fd.to_string(), p(&image)])
        .spawn()
        .unwrap();
    drop(theirs);
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut client = RawClient { stream: ours };
    let mut greeting = [0u8; 18];
    client.stream.read_exact(&mut greeting).unwrap();
    assert_eq!(be_u64(&greeting, 0), NBD_MAGIC);
    client
        .send(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    let (size, _) = client.go(true);
    assert_eq!(size, 4 * MIB);
    assert_eq!(client.write(1, 65536, &[0xfd; 8192]).error, 0);
    client.request(CMD_FLAG_FUA, CMD_WRITE, 2, 0, 512);
    client.send(&[0xfe; 512]).unwrap();
    assert_eq!(client.reply(0).error, 0);
    client.request(0, CMD_FLUSH, 3, 0, 0);
    assert_eq!(client.reply(0).error, 0);
    client.request(0, CMD_DISC, 4, 0, 0);
    drop(client);
    let status = child.wait().unwrap();
    assert!(status.success());
    qemu_io(
        "raw",
        p(&image),
        &[
            "read -P 0xfe 0 512",
            "read -P 0xfd 64k 8k",
            "read -P 0 72k 8k",
        ],
    );
}

/// On tmpfs (page cache, one thread taking batches), 1 MiB reads through a qcow2 top into
/// its raw base: the bytes equal qemu's reading of the chain, with simple replies and with
/// structured ones (data chunks, DONE by the end).
#[test]
fn tmpfs_large_reads_through_a_chain() {
    let dir = TempDir::new_in("/dev/shm").unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    let mut bytes = vec![0u8; 16 * MIB as usize];
    for (i, chunk) in bytes.chunks_mut(4096).enumerate() {
        chunk.fill((i * 7 % 251) as u8 + 1);
    }
    std::fs::write(&base, &bytes).unwrap();
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(&top),
    ]);
    qemu_io("qcow2", p(&top), &["write -P 0xc4 4M 1M"]);
    let expected = dir.path().join("expected.raw");
    qemu_img(&["convert", "-O", "raw", p(&top), p(&expected)]);
    let server = Server::start(dir.path(), &top, &[]);

    let copied = dir.path().join("copied.raw");
    run_ok(Command::new("nbdcopy").args(["--request-size=1048576", &server.uri, p(&copied)]));
    run_ok(Command::new("cmp").args([p(&expected), p(&copied)]));
    let expected_bytes = std::fs::read(&expected).unwrap();

    // Simple replies: header, then exactly the bytes.
    let mut client = RawClient::connect(&server.socket);
    client.go(false);
    for (handle, offset) in [(1u64, 0u64), (2, 3 * MIB + 4096), (3, 4 * MIB)] {
        let reply = client.read(handle, offset, MIB as u32);
        assert_eq!((reply.handle, reply.error), (handle, 0));
        assert!(reply.payload == expected_bytes[offset as usize..(offset + MIB) as usize]);
    }
    // Structured: an OFFSET_DATA chunk (DONE set or not), and DONE by the end.
    let mut client = RawClient::connect(&server.socket);
    client.go(true);
    for (handle, offset) in [(4u64, 8 * MIB), (5, 4 * MIB)] {
        client.request(0, CMD_READ, handle, offset, MIB as u32);
        let mut data = Vec::new();
        loop {
            let mut header = [0u8; 20];
            client.stream.read_exact(&mut header).unwrap();
            assert_eq!(be_u32(&header, 0), STRUCTURED_REPLY_MAGIC);
            assert_eq!(be_u64(&header, 8), handle);
            let mut payload = vec![0u8; be_u32(&header, 16) as usize];
            client.stream.read_exact(&mut payload).unwrap();
            match be_u16(&header, 6) {
                REPLY_TYPE_OFFSET_DATA => {
                    assert_eq!(be_u64(&payload, 0), offset);
                    data.extend_from_slice(&payload[8..]);
                }
                REPLY_TYPE_NONE => assert!(payload.is_empty()),
                other => panic!("chunk type {other}"),
            }
            if be_u16(&header, 4) & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        assert!(data == expected_bytes[offset as usize..(offset + MIB) as usize]);
    }
}
