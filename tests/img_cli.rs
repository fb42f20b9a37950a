//! `ferrotap img` end to end: the built binary for every verb, checked against qemu-img and
//! qemu-io as oracles (and libvhdi's vhdiinfo for VHDs). A missing oracle fails the test:
//! `.ci/setup` installs them all.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferrotap::image::{Image, ImageOptions};
use serde_json::Value;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn ferrotap() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ferrotap"));
    command.stdin(Stdio::null());
    command
}

fn tool(name: &str) -> Command {
    let mut command = Command::new(name);
    command.stdin(Stdio::null());
    command
}

fn output_of(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?} (run .ci/setup to install it): {e}"))
}

/// Run and require success; returns stdout.
fn ok(command: &mut Command) -> String {
    let output = output_of(command);
    assert!(
        output.status.success(),
        "{command:?} failed with {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn code(command: &mut Command) -> (i32, String, String) {
    let output = output_of(command);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stderr.contains("panicked"),
        "{command:?} panicked: {stderr}"
    );
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
    )
}

fn img(args: &[&str]) -> Command {
    let mut command = ferrotap();
    command.arg("img").args(args);
    command
}

fn qemu_img(args: &[&str]) -> Command {
    let mut command = tool("qemu-img");
    command.args(args);
    command
}

fn qemu_io(format: &str, file: &Path, ops: &[&str]) {
    let mut command = tool("qemu-io");
    command.args(["-f", format]);
    for op in ops {
        command.args(["-c", op]);
    }
    command.arg(file);
    ok(&mut command);
}

/// `qemu-img convert -O format src dst`, which must succeed.
fn qemu_convert(format: &str, src: &Path, dst: &Path) {
    ok(&mut qemu_img(&["convert", "-O", format, s(src), s(dst)]));
}

/// `ferrotap img convert -O format src dst`, which must succeed.
fn ferrotap_convert(format: &str, src: &Path, dst: &Path) {
    ok(&mut img(&["convert", "-O", format, s(src), s(dst)]));
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A raw file of `size` bytes with patterned data in a few places and holes elsewhere.
    fn patterned_raw(&self, name: &str, size: u64) -> PathBuf {
        let path = self.path(name);
        let file = File::create(&path).unwrap();
        file.set_len(size).unwrap();
        for (i, (offset, len)) in [(0, 4096), (70_000, 100_000), (3 * MIB - 512, 1024)]
            .into_iter()
            .chain([(size - 8192, 8192)])
            .enumerate()
        {
            file.write_all_at(&pattern(i as u8 + 1, len as usize), offset)
                .unwrap();
        }
        path
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// The whole guest disk of a standalone VHD as libvhdi reads it (Debian's python3 module:
/// /usr/bin/python3, not a pyenv python on PATH).
fn libvhdi_read(path: &Path) -> Vec<u8> {
    let script = "import pyvhdi, sys\n\
                  f = pyvhdi.file()\n\
                  f.open(sys.argv[1])\n\
                  sys.stdout.buffer.write(f.read_buffer(f.get_media_size()))\n";
    let output = output_of(
        Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(path),
    );
    assert!(
        output.status.success(),
        "pyvhdi could not read {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn qemu_info(path: &Path) -> Value {
    json(&ok(&mut qemu_img(&["info", "--output", "json", s(path)])))
}

fn ferrotap_info(path: &Path) -> Value {
    json(&ok(&mut img(&["info", "--json", s(path)])))
}

/// qemu's driver name for a format.
fn qemu_format(format: &str) -> &str {
    if format == "vhd" {
        "vpc"
    } else {
        format
    }
}

#[test]
fn create_then_info_agrees_with_qemu_img() {
    let scratch = Scratch::new();
    for format in ["raw", "qcow2", "vhd"] {
        let path = scratch.path(&format!("new.{format}"));
        let out = ok(&mut img(&["create", "-f", format, s(&path), "64M"]));
        assert!(out.starts_with("Formatting"), "{out}");
        let qemu = qemu_info(&path);
        assert_eq!(qemu["format"], qemu_format(format), "{format}");
        assert_eq!(qemu["virtual-size"], 64 * MIB, "{format}");
        let ours = ferrotap_info(&path);
        assert_eq!(ours["format"], format);
        assert_eq!(ours["virtual-size"], qemu["virtual-size"], "{format}");
        assert_eq!(ours["chain"].as_array().unwrap().len(), 1);
        if format != "raw" {
            assert_eq!(ours["cluster-size"], qemu["cluster-size"], "{format}");
        }
        // The human form names the same facts.
        let human = ok(&mut img(&["info", s(&path)]));
        assert!(human.contains(&format!("file format: {format}")), "{human}");
        assert!(human.contains("(67108864 bytes)"), "{human}");
    }
    // libvhdi reads ferrotap's VHD and agrees on the size.
    let vhdi = ok(tool("vhdiinfo").arg(scratch.path("new.vhd")));
    assert!(vhdi.contains("67108864 bytes"), "{vhdi}");
}

#[test]
fn create_with_backing_takes_its_size_and_qemu_img_sees_the_chain() {
    let scratch = Scratch::new();
    scratch.patterned_raw("base.raw", 16 * MIB);
    ferrotap_convert("vhd", &scratch.path("base.raw"), &scratch.path("base.vhd"));
    ok(&mut img(&[
        "create",
        "-f",
        "qcow2",
        s(&scratch.path("base.qcow2")),
        "16M",
    ]));
    for (base, base_format) in [
        ("base.raw", "raw"),
        ("base.qcow2", "qcow2"),
        ("base.vhd", "vhd"),
    ] {
        // No SIZE, no -F: the size and format come from the (relative) backing file.
        let overlay = scratch.path(&format!("over-{base_format}.qcow2"));
        ok(&mut img(&[
            "create",
            "-f",
            "qcow2",
            "-b",
            base,
            s(&overlay),
        ]));
        let qemu = qemu_info(&overlay);
        assert_eq!(qemu["virtual-size"], 16 * MIB);
        assert_eq!(qemu["backing-filename"], base);
        assert_eq!(qemu["backing-filename-format"], qemu_format(base_format));
        let ours = ferrotap_info(&overlay);
        assert_eq!(ours["backing-filename"], base);
        assert_eq!(ours["backing-filename-format"], base_format);
        let full = fs::canonicalize(scratch.path(base)).unwrap();
        assert_eq!(ours["full-backing-filename"], s(&full));
        let chain = ours["chain"].as_array().unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1]["format"], base_format);
        // qemu reads the new chain as the base (for a VHD base, qemu's own reading of a
        // standalone dynamic VHD is trustworthy).
        ok(&mut qemu_img(&[
            "compare",
            s(&overlay),
            s(&scratch.path(base)),
        ]));
        // --backing-chain describes both layers.
        let both = json(&ok(&mut img(&[
            "info",
            "--json",
            "--backing-chain",
            s(&overlay),
        ])));
        assert_eq!(both.as_array().unwrap().len(), 2);
        assert_eq!(both[1]["format"], base_format);
    }
    // A differencing VHD on a VHD: libvhdi sees the parent recorded.
    let child = scratch.path("child.vhd");
    ok(&mut img(&[
        "create",
        "-f",
        "vhd",
        "-b",
        "base.vhd",
        s(&child),
    ]));
    let ours = ferrotap_info(&child);
    assert_eq!(ours["virtual-size"], 16 * MIB);
    assert_eq!(ours["backing-filename-format"], "vhd");
    let vhdi = ok(tool("vhdiinfo").arg(&child));
    assert!(vhdi.to_lowercase().contains("differential"), "{vhdi}");
    assert!(vhdi.contains("base.vhd"), "{vhdi}");
}

/// A qcow2 written by qemu-io: data, explicit zeros over data, and an unaligned write.
fn qemu_written_qcow2(scratch: &Scratch, name: &str, cluster: &str) -> PathBuf {
    let path = scratch.path(name);
    ok(&mut qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster}"),
        s(&path),
        "16M",
    ]));
    qemu_io(
        "qcow2",
        &path,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 300k",
            "write -P 0x33 5000 3000",
            "write -z 1088k 64k",
            "write -P 0x44 15M 1M",
        ],
    );
    path
}

#[test]
fn convert_between_all_formats_agrees_with_qemu_img() {
    let scratch = Scratch::new();
    let source = qemu_written_qcow2(&scratch, "source.qcow2", "64k");
    // qemu-img's own conversions are the reference.
    let reference_raw = scratch.path("reference.raw");
    let reference_qcow2 = scratch.path("reference.qcow2");
    qemu_convert("raw", &source, &reference_raw);
    qemu_convert("qcow2", &source, &reference_qcow2);

    let mut outputs = Vec::new();
    for format in ["raw", "qcow2", "vhd"] {
        let out = scratch.path(&format!("ours.{format}"));
        ferrotap_convert(format, &source, &out);
        ok(&mut qemu_img(&["compare", s(&source), s(&out)]));
        ok(&mut qemu_img(&["compare", s(&reference_qcow2), s(&out)]));
        let (rc, stdout, _) = code(&mut img(&["compare", s(&reference_raw), s(&out)]));
        assert_eq!(
            (rc, stdout.trim()),
            (0, "Images are identical."),
            "{format}"
        );
        // What ferrotap wrote is clean by qemu's check (the VHD by ours).
        if format == "qcow2" {
            ok(&mut qemu_img(&["check", s(&out)]));
        }
        let (rc, _, _) = code(&mut img(&["check", s(&out)]));
        assert_eq!(rc, 0, "{format}");
        outputs.push(out);
    }
    // Raw output is byte-identical to qemu-img's; libvhdi reads the VHD as the same disk.
    let reference_bytes = fs::read(&reference_raw).unwrap();
    assert!(fs::read(&outputs[0]).unwrap() == reference_bytes);
    assert!(libvhdi_read(&outputs[2]) == reference_bytes);
    // Sparse: the zero parts were not written (16 MiB disk, ~1.4 MiB of data).
    let ours_raw = ferrotap_info(&outputs[0]);
    assert!(
        ours_raw["actual-size"].as_u64().unwrap() < 4 * MIB,
        "{ours_raw}"
    );
    // VHDs qemu makes itself (dynamic and fixed) convert to what qemu's own convert gives.
    for subformat in ["dynamic", "fixed"] {
        let qemu_vhd = scratch.path(&format!("qemu-{subformat}.vhd"));
        ok(&mut qemu_img(&[
            "convert",
            "-O",
            "vpc",
            "-o",
            &format!("subformat={subformat},force_size=on"),
            s(&source),
            s(&qemu_vhd),
        ]));
        let expected = scratch.path(&format!("qemu-{subformat}.raw"));
        ok(&mut qemu_img(&[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            s(&qemu_vhd),
            s(&expected),
        ]));
        let ours = scratch.path(&format!("ours-from-{subformat}.raw"));
        ferrotap_convert("raw", &qemu_vhd, &ours);
        assert!(
            fs::read(&ours).unwrap() == fs::read(&expected).unwrap(),
            "{subformat}"
        );
        let ours_qcow2 = scratch.path(&format!("ours-from-{subformat}.qcow2"));
        ferrotap_convert("qcow2", &qemu_vhd, &ours_qcow2);
        ok(&mut qemu_img(&[
            "compare",
            "-F",
            "vpc",
            s(&ours_qcow2),
            s(&qemu_vhd),
        ]));
    }
    // Round trips through the other formats: vhd -> qcow2 -> raw.
    let again_qcow2 = scratch.path("again.qcow2");
    let again_raw = scratch.path("again.raw");
    ok(&mut img(&[
        "convert",
        "-f",
        "vhd",
        "-O",
        "qcow2",
        s(&outputs[2]),
        s(&again_qcow2),
    ]));
    ferrotap_convert("raw", &again_qcow2, &again_raw);
    assert!(fs::read(&again_raw).unwrap() == fs::read(&reference_raw).unwrap());
    // -p on a pipe: no bar, no control characters, same result.
    let piped = scratch.path("piped.qcow2");
    let (rc, stdout, stderr) = code(&mut img(&[
        "convert",
        "-p",
        "-O",
        "qcow2",
        s(&source),
        s(&piped),
    ]));
    assert_eq!((rc, stdout.as_str(), stderr.as_str()), (0, "", ""));
    ok(&mut qemu_img(&["compare", s(&source), s(&piped)]));
}

#[test]
fn huge_sparse_images_are_walked_by_extent_not_by_chunk() {
    let scratch = Scratch::new();
    let huge = scratch.path("huge.qcow2");
    ok(&mut qemu_img(&["create", "-f", "qcow2", s(&huge), "64T"]));
    qemu_io("qcow2", &huge, &["write -P 0x5a 30T 1M"]);
    // 64 TiB in 2 MiB steps would be 32 million steps; by extent it is a handful.
    let started = std::time::Instant::now();
    let copy = scratch.path("copy.qcow2");
    ferrotap_convert("qcow2", &huge, &copy);
    ok(&mut img(&["compare", s(&huge), s(&copy)]));
    let top = scratch.path("top.qcow2");
    ok(&mut qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "copy.qcow2",
        s(&top),
    ]));
    qemu_io("qcow2", &top, &["write -P 0x5b 40T 64k"]);
    ok(&mut img(&["commit", s(&top)]));
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
    ok(&mut qemu_img(&["compare", s(&top), s(&copy)]));
    ok(&mut qemu_img(&["check", s(&copy)]));
    assert_eq!(qemu_info(&copy)["virtual-size"], 64u64 << 40);
}

#[test]
fn compare_reports_what_qemu_img_reports() {
    let scratch = Scratch::new();
    let a = scratch.patterned_raw("a.raw", 8 * MIB);
    let b = scratch.path("b.raw");
    fs::copy(&a, &b).unwrap();
    let vhd = scratch.path("b.vhd");
    ferrotap_convert("vhd", &b, &vhd);
    let file = OpenOptions::new().write(true).open(&b).unwrap();
    file.write_all_at(b"!", 1_234_567).unwrap();
    drop(file);
    let (qemu_rc, qemu_out, _) = code(&mut qemu_img(&["compare", s(&a), s(&b)]));
    let (our_rc, our_out, _) = code(&mut img(&["compare", s(&a), s(&b)]));
    assert_eq!(qemu_rc, 1);
    assert_eq!((our_rc, our_out.as_str()), (qemu_rc, qemu_out.as_str()));
    assert_eq!(our_out.trim(), "Content mismatch at offset 1234432!");
    // Across formats: the VHD holds a's contents.
    let (rc, out, _) = code(&mut img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vhd",
        s(&a),
        s(&vhd),
    ]));
    assert_eq!((rc, out.trim()), (0, "Images are identical."));
    // Sizes differ: identical while the extra part is zeros, as qemu-img says.
    let longer = scratch.path("longer.raw");
    fs::copy(&a, &longer).unwrap();
    File::options()
        .write(true)
        .open(&longer)
        .unwrap()
        .set_len(9 * MIB)
        .unwrap();
    for extra_byte in [None, Some(8 * MIB + 100_000)] {
        if let Some(at) = extra_byte {
            File::options()
                .write(true)
                .open(&longer)
                .unwrap()
                .write_all_at(b"x", at)
                .unwrap();
        }
        let qemu = code(&mut qemu_img(&["compare", s(&a), s(&longer)]));
        let ours = code(&mut img(&["compare", s(&a), s(&longer)]));
        assert_eq!((ours.0, &ours.1), (qemu.0, &qemu.1));
        let strict_qemu = code(&mut qemu_img(&["compare", "-s", s(&a), s(&longer)]));
        let strict_ours = code(&mut img(&["compare", "-s", s(&a), s(&longer)]));
        assert_eq!(
            (strict_ours.0, &strict_ours.1),
            (strict_qemu.0, &strict_qemu.1)
        );
    }
    // Errors exit 2, as in qemu-img.
    let (rc, _, stderr) = code(&mut img(&["compare", s(&a), s(&scratch.path("missing"))]));
    assert_eq!(rc, 2);
    assert!(stderr.starts_with("ferrotap: "), "{stderr}");
}

/// Map entries, normalized for the one thing the image layer's API does not carry: qemu
/// shows the file offset of a zero cluster that keeps its allocation (`Mapping::Zero` has
/// no offset). Zero entries lose their offset, and neighbours that then match are merged.
fn map_entries(text: &str) -> Vec<Value> {
    let mut merged: Vec<Value> = Vec::new();
    for mut entry in json(text).as_array().unwrap().clone() {
        if entry["zero"] == true {
            entry.as_object_mut().unwrap().remove("offset");
        }
        if let Some(last) = merged.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| last[k] == entry[k]);
            let contiguous = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap()
                == entry["start"].as_u64().unwrap();
            let offsets_follow = match (last.get("offset"), entry.get("offset")) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    a.as_u64().unwrap() + last["length"].as_u64().unwrap() == b.as_u64().unwrap()
                }
                _ => false,
            };
            if same && contiguous && offsets_follow {
                let length = last["length"].as_u64().unwrap() + entry["length"].as_u64().unwrap();
                last["length"] = length.into();
                continue;
            }
        }
        merged.push(entry);
    }
    merged
}

#[test]
fn map_agrees_with_qemu_img_map() {
    let scratch = Scratch::new();
    for cluster in ["64k", "4k", "512"] {
        let base = qemu_written_qcow2(&scratch, &format!("base-{cluster}.qcow2"), cluster);
        let ours = map_entries(&ok(&mut img(&["map", "--json", s(&base)])));
        let qemu = map_entries(&ok(&mut qemu_img(&["map", "--output", "json", s(&base)])));
        assert_eq!(ours, qemu, "cluster size {cluster}");
        assert!(ours
            .iter()
            .any(|e| e["zero"] == true && e["present"] == true));
        // An overlay with its own writes: depths and offsets of both layers.
        let overlay = scratch.path(&format!("overlay-{cluster}.qcow2"));
        ok(&mut qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            s(&base),
            s(&overlay),
        ]));
        qemu_io(
            "qcow2",
            &overlay,
            &["write -P 0x55 1056k 64k", "write -z 0 4k"],
        );
        let ours = map_entries(&ok(&mut img(&["map", "--json", s(&overlay)])));
        let qemu = map_entries(&ok(&mut qemu_img(&[
            "map",
            "--output",
            "json",
            s(&overlay),
        ])));
        assert_eq!(ours, qemu, "overlay, cluster size {cluster}");
    }
    // Compressed clusters (qemu-img convert -c) and a compat 0.10 image.
    let compressed = scratch.path("compressed.qcow2");
    ok(&mut qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        s(&scratch.path("base-64k.qcow2")),
        s(&compressed),
    ]));
    let old = scratch.path("old.qcow2");
    ok(&mut qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        s(&old),
        "4M",
    ]));
    qemu_io("qcow2", &old, &["write -P 5 0 1M", "write -z 0 64k"]);
    for path in [&compressed, &old] {
        let ours = map_entries(&ok(&mut img(&["map", "--json", s(path)])));
        let qemu = map_entries(&ok(&mut qemu_img(&["map", "--output", "json", s(path)])));
        assert_eq!(ours, qemu, "{}", path.display());
    }
    // --layers lists each layer's own extents: the top's data is what qemu-img map shows
    // as data at depth 0 (two clusters for the unaligned write, one copied up for the
    // partial zero write).
    let overlay = scratch.path("overlay-64k.qcow2");
    let layers = json(&ok(&mut img(&["map", "--json", "--layers", s(&overlay)])));
    let layers = layers.as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let top_data: u64 = layers[0]["extents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "data")
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let qemu_top_data: u64 = map_entries(&ok(&mut qemu_img(&[
        "map",
        "--output",
        "json",
        s(&overlay),
    ])))
    .iter()
    .filter(|e| e["depth"] == 0 && e["data"] == true)
    .map(|e| e["length"].as_u64().unwrap())
    .sum();
    assert_eq!(top_data, qemu_top_data);
    assert_eq!(top_data, 3 * 64 * 1024);
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Give a qcow2 (16-bit refcounts) a cluster that is counted but referenced by nothing.
fn add_leaked_cluster(path: &Path) {
    let bytes = fs::read(path).unwrap();
    let cluster = 1u64 << be_u32(&bytes, 20);
    assert_eq!(be_u32(&bytes, 96), 4, "test expects 16-bit refcounts");
    let refcount_table = be_u64(&bytes, 48) as usize;
    let refcount_block = be_u64(&bytes, refcount_table) & !0x1ff;
    let leaked = (bytes.len() as u64).div_ceil(cluster);
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&vec![0xab; cluster as usize], leaked * cluster)
        .unwrap();
    file.write_all_at(&1u16.to_be_bytes(), refcount_block + leaked * 2)
        .unwrap();
}

/// Point the first L2 entry of a qcow2 at its refcount table: a cluster used twice.
fn corrupt_first_l2_entry(path: &Path) {
    let bytes = fs::read(path).unwrap();
    let l1 = be_u64(&bytes, 40) as usize;
    let l2 = (be_u64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as u64;
    assert_ne!(l2, 0, "test expects an allocated L2 table");
    let refcount_table = be_u64(&bytes, 48);
    let file = OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&(refcount_table | 1 << 63).to_be_bytes(), l2)
        .unwrap();
}

#[test]
fn check_exit_codes_match_qemu_img() {
    let scratch = Scratch::new();
    let clean = qemu_written_qcow2(&scratch, "clean.qcow2", "64k");
    let leaky = scratch.path("leaky.qcow2");
    let corrupt = scratch.path("corrupt.qcow2");
    fs::copy(&clean, &leaky).unwrap();
    fs::copy(&clean, &corrupt).unwrap();
    add_leaked_cluster(&leaky);
    corrupt_first_l2_entry(&corrupt);
    for (path, expected) in [(&clean, 0), (&leaky, 3), (&corrupt, 2)] {
        let (qemu_rc, _, _) = code(&mut qemu_img(&["check", s(path)]));
        assert_eq!(qemu_rc, expected, "qemu-img check {}", path.display());
        let (rc, stdout, _) = code(&mut img(&["check", s(path)]));
        assert_eq!(rc, expected, "ferrotap check {}: {stdout}", path.display());
        let (rc, stdout, _) = code(&mut img(&["check", "--output", "json", s(path)]));
        assert_eq!(rc, expected);
        let report = json(&stdout);
        assert_eq!(report["format"], "qcow2");
        let (corruptions, leaks) = (
            report["corruptions"].as_u64().unwrap(),
            report["leaks"].as_u64().unwrap(),
        );
        match expected {
            0 => assert_eq!((corruptions, leaks), (0, 0)),
            2 => assert!(corruptions > 0),
            _ => assert!(corruptions == 0 && leaks > 0),
        }
    }
    // VHD and raw made by ferrotap check clean.
    let raw = scratch.patterned_raw("p.raw", 4 * MIB);
    let vhd = scratch.path("p.vhd");
    ferrotap_convert("vhd", &raw, &vhd);
    for path in [&raw, &vhd] {
        let (rc, stdout, _) = code(&mut img(&["check", s(path)]));
        assert_eq!(rc, 0, "{stdout}");
        assert!(stdout.contains("No errors were found on the image."));
    }
    // A check that cannot run (not a qcow2 at all) exits 1 with an error naming the file.
    let (rc, _, stderr) = code(&mut img(&["check", "-f", "qcow2", s(&raw)]));
    assert_eq!(rc, 1);
    assert!(
        stderr.starts_with("ferrotap: ") && stderr.contains("p.raw"),
        "{stderr}"
    );
}

/// The parts of a dynamic VHD these tests edit, located per the VHD spec: the footer's
/// data offset gives the dynamic header, whose table offset and max table entries give
/// the BAT; blktap's batmap header (`tdbatmap`) follows the BAT and names its map.
struct VhdLayout {
    bytes: Vec<u8>,
    bat: usize,
    entries: usize,
    batmap_header: usize,
    batmap: usize,
    batmap_bytes: usize,
}

impl VhdLayout {
    fn read(path: &Path) -> VhdLayout {
        let bytes = fs::read(path).unwrap();
        let header = be_u64(&bytes, 16) as usize;
        assert_eq!(&bytes[header..header + 8], b"cxsparse");
        let bat = be_u64(&bytes, header + 16) as usize;
        let entries = be_u32(&bytes, header + 28) as usize;
        let batmap_header = bat
            + bytes[bat..]
                .windows(8)
                .position(|w| w == b"tdbatmap")
                .expect("ferrotap writes blktap's batmap");
        let batmap = be_u64(&bytes, batmap_header + 8) as usize;
        let batmap_bytes = be_u32(&bytes, batmap_header + 16) as usize * 512;
        VhdLayout {
            bytes,
            bat,
            entries,
            batmap_header,
            batmap,
            batmap_bytes,
        }
    }

    fn bat_entry(&self, block: usize) -> u32 {
        be_u32(&self.bytes, self.bat + 4 * block)
    }

    /// Set a block's batmap bit (most significant bit first) and keep the batmap's
    /// checksum (one's complement of the byte sum) right, so only the bit is wrong.
    fn set_batmap_bit(&mut self, block: usize) {
        self.bytes[self.batmap + block / 8] |= 0x80 >> (block % 8);
        let sum: u32 = self.bytes[self.batmap..self.batmap + self.batmap_bytes]
            .iter()
            .map(|&b| u32::from(b))
            .sum();
        let at = self.batmap_header + 24;
        self.bytes[at..at + 4].copy_from_slice(&(!sum).to_be_bytes());
    }
}

#[test]
fn vhd_check_exit_codes_on_clean_corrupt_and_leaking_images() {
    let scratch = Scratch::new();
    // 8 MiB: blocks 0..2 hold data, block 3 is unallocated.
    let raw = scratch.path("six.raw");
    let file = File::create(&raw).unwrap();
    file.set_len(8 * MIB).unwrap();
    file.write_all_at(&pattern(3, 6 * MIB as usize), 0).unwrap();
    drop(file);
    let clean = scratch.path("clean.vhd");
    ferrotap_convert("vhd", &raw, &clean);
    let layout = VhdLayout::read(&clean);
    assert_eq!(layout.entries, 4);
    assert_eq!(layout.bat_entry(3), u32::MAX, "block 3 unallocated");

    // Corrupt: the batmap calls unallocated block 3 fully allocated.
    let mut corrupt = VhdLayout::read(&clean);
    corrupt.set_batmap_bit(3);
    let corrupt_path = scratch.path("corrupt.vhd");
    fs::write(&corrupt_path, &corrupt.bytes).unwrap();
    // Leaking: 1 MiB nothing references, between the last block and the footer.
    let bytes = &layout.bytes;
    let mut leaking = bytes[..bytes.len() - 512].to_vec();
    leaking.extend(vec![0u8; MIB as usize]);
    leaking.extend(&bytes[bytes.len() - 512..]);
    let leaking_path = scratch.path("leaking.vhd");
    fs::write(&leaking_path, &leaking).unwrap();

    for (path, expected, says) in [
        (&clean, 0, "No errors were found"),
        (&corrupt_path, 2, "batmap bit 3"),
        (&leaking_path, 3, "leaked"),
    ] {
        let (rc, stdout, _) = code(&mut img(&["check", s(path)]));
        assert_eq!(rc, expected, "{}: {stdout}", path.display());
        assert!(stdout.contains(says), "{stdout}");
    }
    // The leak is harmless: the guest still reads the same disk (libvhdi agrees).
    ok(&mut img(&["compare", s(&leaking_path), s(&raw)]));
    assert!(libvhdi_read(&leaking_path) == fs::read(&raw).unwrap());

    // A BAT entry overlapping another block: the image still opens (the rest stays
    // readable), and check reports the entry by its offset as a corruption (2).
    let mut overlap = layout.bytes.clone();
    let entry0 = layout.bat_entry(0).to_be_bytes();
    overlap[layout.bat + 4..layout.bat + 8].copy_from_slice(&entry0);
    let overlap_path = scratch.path("overlap.vhd");
    fs::write(&overlap_path, &overlap).unwrap();
    let (rc, stdout, _) = code(&mut img(&["check", s(&overlap_path)]));
    assert_eq!(rc, 2, "{stdout}");
    let bat_entry_1 = format!("BAT entry 1 at offset {:#x}", layout.bat + 4);
    assert!(
        stdout.contains(&bat_entry_1) && stdout.contains("overlaps"),
        "{stdout}"
    );
    let report = json(&code(&mut img(&["check", "--json", s(&overlap_path)])).1);
    assert!(report["corruptions"].as_u64().unwrap() >= 1, "{report}");
}

/// Flatten `chain` to raw with ferrotap, before any commit.
fn flatten(chain: &Path, out: &Path) {
    ferrotap_convert("raw", chain, out);
}

#[test]
fn commit_qcow2_into_qcow2_equals_the_flattened_chain() {
    let scratch = Scratch::new();
    let base = qemu_written_qcow2(&scratch, "base.qcow2", "64k");
    let top = scratch.path("top.qcow2");
    ok(&mut qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        s(&top),
    ]));
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x66 32k 64k",
            "write -z 1M 100k",
            "write -P 0x77 15M 512",
            "write -P 0x78 8M 2M",
        ],
    );
    let flat = scratch.path("flat.raw");
    flatten(&top, &flat);
    let reference = scratch.path("reference.raw");
    qemu_convert("raw", &top, &reference);
    assert!(fs::read(&flat).unwrap() == fs::read(&reference).unwrap());
    let (rc, _, stderr) = code(&mut img(&["commit", "-p", s(&top)]));
    assert_eq!((rc, stderr.as_str()), (0, ""));
    ok(&mut qemu_img(&["compare", s(&base), s(&flat)]));
    ok(&mut img(&["compare", s(&base), s(&flat)]));
    ok(&mut qemu_img(&["check", s(&base)]));
    // The top (kept) still reads as the same disk.
    ok(&mut qemu_img(&["compare", s(&top), s(&flat)]));
}

#[test]
fn commit_into_a_smaller_raw_base_grows_it() {
    let scratch = Scratch::new();
    let base = scratch.patterned_raw("base.raw", 8 * MIB);
    let top = scratch.path("top.qcow2");
    ok(&mut qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        "base.raw",
        s(&top),
    ]));
    ok(&mut qemu_img(&["resize", s(&top), "12M"]));
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x21 7M 2M",
            "write -P 0x22 11M 4k",
            "write -z 0 64k",
        ],
    );
    let reference = scratch.path("reference.raw");
    qemu_convert("raw", &top, &reference);
    ok(&mut img(&["commit", s(&top)]));
    assert_eq!(qemu_info(&base)["virtual-size"], 12 * MIB);
    // (qemu-img's -s also compares allocation, which legitimately differs here.)
    ok(&mut qemu_img(&["compare", s(&base), s(&reference)]));
    ok(&mut img(&["compare", "-s", s(&base), s(&reference)]));
}

#[test]
fn commit_qcow2_into_a_vhd_base() {
    let scratch = Scratch::new();
    let raw = scratch.patterned_raw("pattern.raw", 10 * MIB);
    let base = scratch.path("base.vhd");
    ferrotap_convert("vhd", &raw, &base);
    // qemu makes and writes the qcow2 top over ferrotap's VHD, and flattens the chain.
    let top = scratch.path("top.qcow2");
    ok(&mut qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-F",
        "vpc",
        "-b",
        "base.vhd",
        s(&top),
    ]));
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x31 1M 3M",
            "write -z 0 4k",
            "write -P 0x32 9M 12345",
        ],
    );
    let reference = scratch.path("reference.raw");
    qemu_convert("raw", &top, &reference);
    ok(&mut img(&["commit", s(&top)]));
    ok(&mut img(&["compare", s(&base), s(&reference)]));
    ok(&mut qemu_img(&[
        "compare",
        "-f",
        "vpc",
        s(&base),
        s(&reference),
    ]));
    // The VHD stays consistent (batmap included) and libvhdi reads the committed disk.
    let (rc, stdout, _) = code(&mut img(&["check", s(&base)]));
    assert_eq!(rc, 0, "{stdout}");
    assert!(libvhdi_read(&base) == fs::read(&reference).unwrap());
}

#[test]
fn info_with_a_missing_backing_file_still_describes_the_image() {
    let scratch = Scratch::new();
    let base = scratch.path("gone.raw");
    File::create(&base).unwrap().set_len(4 * MIB).unwrap();
    let top = scratch.path("top.qcow2");
    ok(&mut img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "gone.raw",
        s(&top),
    ]));
    fs::remove_file(&base).unwrap();
    let (rc, stdout, stderr) = code(&mut img(&["info", "--json", s(&top)]));
    assert_eq!(rc, 0, "{stderr}");
    assert!(
        stderr.starts_with("ferrotap: warning: ") && stderr.contains("gone.raw"),
        "{stderr}"
    );
    let info = json(&stdout);
    assert_eq!(info["backing-filename"], "gone.raw");
    assert_eq!(info["virtual-size"], 4 * MIB);
    assert!(info.get("chain").is_none());
    // Commands that need the data fail cleanly.
    let (rc, _, stderr) = code(&mut img(&["info", "--backing-chain", s(&top)]));
    assert_eq!(rc, 1);
    assert!(stderr.contains("backing file not found"), "{stderr}");
    let (rc, _, _) = code(&mut img(&["compare", s(&top), s(&top)]));
    assert_eq!(rc, 2);
}

#[test]
fn commit_vhd_into_vhd_equals_the_flattened_chain() {
    let scratch = Scratch::new();
    let raw = scratch.patterned_raw("pattern.raw", 12 * MIB);
    let base = scratch.path("base.vhd");
    ferrotap_convert("vhd", &raw, &base);
    let child = scratch.path("child.vhd");
    ok(&mut img(&[
        "create",
        "-f",
        "vhd",
        "-b",
        "base.vhd",
        s(&child),
    ]));
    {
        let chain = Image::open(&child, ImageOptions::default()).unwrap();
        chain.write_at(&pattern(9, 5000), 3 * MIB - 100).unwrap();
        chain.write_at(&pattern(10, 4096), 7 * MIB).unwrap();
        chain.write_at(&vec![0; 70_000], 60_000).unwrap();
        chain.discard(8 * MIB, MIB).unwrap();
        chain.flush().unwrap();
    }
    let flat = scratch.path("flat.raw");
    flatten(&child, &flat);
    ok(&mut img(&["commit", s(&child)]));
    let (rc, out, _) = code(&mut img(&["compare", s(&base), s(&flat)]));
    assert_eq!((rc, out.trim()), (0, "Images are identical."));
    // qemu reads the committed base (a standalone dynamic VHD) the same way.
    ok(&mut qemu_img(&[
        "compare",
        "-f",
        "vpc",
        "-F",
        "raw",
        s(&base),
        s(&flat),
    ]));
    let (rc, _, _) = code(&mut img(&["check", s(&base)]));
    assert_eq!(rc, 0);
    assert!(libvhdi_read(&base) == fs::read(&flat).unwrap());
    let (rc, _, _) = code(&mut img(&["compare", s(&child), s(&flat)]));
    assert_eq!(rc, 0);
}

#[test]
fn resize_grows_and_qemu_img_sees_it() {
    let scratch = Scratch::new();
    for format in ["raw", "qcow2"] {
        let path = scratch.path(&format!("r.{format}"));
        ok(&mut img(&["create", "-f", format, s(&path), "16M"]));
        ok(&mut img(&["resize", s(&path), "+16M"]));
        assert_eq!(qemu_info(&path)["virtual-size"], 32 * MIB, "{format}");
        ok(&mut img(&["resize", s(&path), "48M"]));
        assert_eq!(qemu_info(&path)["virtual-size"], 48 * MIB, "{format}");
        if format == "qcow2" {
            ok(&mut qemu_img(&["check", s(&path)]));
        }
        // Shrinking needs --shrink.
        let (rc, _, stderr) = code(&mut img(&["resize", s(&path), "-8M"]));
        assert_eq!(rc, 1);
        assert!(stderr.contains("--shrink"), "{stderr}");
    }
    let raw = scratch.path("r.raw");
    ok(&mut img(&["resize", "--shrink", s(&raw), "-8M"]));
    assert_eq!(qemu_info(&raw)["virtual-size"], 40 * MIB);
    // A dynamic VHD grows within what its BAT addresses (15 MiB -> 8 blocks of 2 MiB),
    // and refuses beyond it with an error naming the BAT's limit.
    let vhd = scratch.path("r.vhd");
    ok(&mut img(&["create", "-f", "vhd", s(&vhd), "15M"]));
    ok(&mut img(&["resize", s(&vhd), "16M"]));
    assert_eq!(qemu_info(&vhd)["virtual-size"], 16 * MIB);
    assert_eq!(ferrotap_info(&vhd)["virtual-size"], 16 * MIB);
    ok(tool("vhdiinfo").arg(&vhd));
    let (rc, _, stderr) = code(&mut img(&["resize", s(&vhd), "+16M"]));
    assert_eq!(rc, 1);
    assert!(
        stderr.starts_with("ferrotap: ") && stderr.contains("BAT"),
        "{stderr}"
    );
    assert_eq!(qemu_info(&vhd)["virtual-size"], 16 * MIB);
}

#[test]
fn demo_runs_and_its_images_pass_qemu_img() {
    // The demo's simulated host runs blkback-shim from beside ferrotap.
    common::shim_binary();
    let scratch = Scratch::new();
    let dir = scratch.path("demo");
    let out = ok(ferrotap().args(["demo", "--size-mib", "16", "--dir", s(&dir)]));
    assert!(out.contains("demo done"), "{out}");
    assert!(
        out.contains("qemu-img compare overlay.qcow2 flat.qcow2: identical"),
        "{out}"
    );
    // The kept images: qemu agrees the qcow2 ones are clean (guest.qcow2 after a simulated
    // guest's I/O through ferrotap serve) and overlay and flat hold the same disk.
    for name in ["overlay.qcow2", "flat.qcow2", "guest.qcow2"] {
        ok(&mut qemu_img(&["check", s(&dir.join(name))]));
    }
    ok(&mut qemu_img(&[
        "compare",
        s(&dir.join("overlay.qcow2")),
        s(&dir.join("flat.qcow2")),
    ]));
    // After the demo's commit, base.vhd holds what the VHD chain held.
    ok(&mut img(&[
        "compare",
        s(&dir.join("base.vhd")),
        s(&dir.join("flat.qcow2")),
    ]));
    // And without --dir it leaves nothing behind in the temporary directory.
    let tmp = scratch.path("tmp");
    fs::create_dir(&tmp).unwrap();
    ok(ferrotap()
        .args(["demo", "--size-mib", "8"])
        .env("TMPDIR", &tmp));
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
}

#[test]
fn bad_input_gives_an_error_not_a_panic() {
    let scratch = Scratch::new();
    let garbage = scratch.path("garbage");
    fs::write(&garbage, vec![0x5a; 3000]).unwrap();
    let truncated_qcow2 = scratch.path("truncated.qcow2");
    fs::write(&truncated_qcow2, b"QFI\xfb\x00\x00\x00\x03").unwrap();
    let missing = scratch.path("missing");
    let cases: Vec<Vec<String>> = vec![
        vec!["info".into(), s(&missing).into()],
        vec![
            "info".into(),
            "-f".into(),
            "qcow2".into(),
            s(&garbage).into(),
        ],
        vec!["info".into(), s(&truncated_qcow2).into()],
        vec!["map".into(), "-f".into(), "vhd".into(), s(&garbage).into()],
        vec![
            "create".into(),
            "-f".into(),
            "raw".into(),
            s(&scratch.path("x")).into(),
            "12Q".into(),
        ],
        vec![
            "create".into(),
            "-f".into(),
            "qcow2".into(),
            s(&scratch.path("y")).into(),
        ],
        vec![
            "create".into(),
            "-f".into(),
            "qcow2".into(),
            "-o".into(),
            "no_such_option=1".into(),
            s(&scratch.path("z")).into(),
            "1M".into(),
        ],
        vec![
            "create".into(),
            "-f".into(),
            "qcow2".into(),
            "-b".into(),
            s(&missing).into(),
            s(&scratch.path("w")).into(),
        ],
        vec![
            "convert".into(),
            "-O".into(),
            "qcow2".into(),
            s(&truncated_qcow2).into(),
            s(&scratch.path("v")).into(),
        ],
        vec!["commit".into(), s(&garbage).into()],
        vec!["resize".into(), s(&garbage).into(), "+1Z".into()],
    ];
    for case in cases {
        let (rc, _, stderr) = code(&mut img(&case
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()));
        assert_eq!(rc, 1, "{case:?}: {stderr}");
        assert!(stderr.starts_with("ferrotap: "), "{case:?}: {stderr}");
    }
    // Creating over a file the command reads from is refused, and the file survives.
    let source = scratch.patterned_raw("source.raw", 4 * MIB);
    let before = fs::read(&source).unwrap();
    for case in [
        vec!["convert", "-O", "qcow2", s(&source), s(&source)],
        vec!["create", "-f", "qcow2", "-b", "source.raw", s(&source)],
    ] {
        let (rc, _, stderr) = code(&mut img(&case));
        assert_eq!(rc, 1, "{case:?}");
        assert!(stderr.contains("refusing to overwrite"), "{stderr}");
        assert!(
            fs::read(&source).unwrap() == before,
            "{case:?} damaged its source"
        );
    }
    // clap rejects an unknown format name before anything runs.
    let (rc, _, stderr) = code(&mut img(&[
        "create",
        "-f",
        "vmdk",
        s(&scratch.path("u")),
        "1M",
    ]));
    assert_ne!(rc, 0);
    assert!(stderr.contains("unknown image format"), "{stderr}");
}
