//! Hostile and damaged qcow2 images: every one gives an error naming the file, the field
//! and its offset (or a check finding doing so); none panics or allocates unboundedly.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::open_ro;
use ferrotap::error::{Error, ErrorKind};
use ferrotap::image::{self, CreateOptions, Format, Image, ImageOptions, OpenMode};
use proptest::prelude::*;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required for this test: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A qemu-made v3 image with 4 KiB clusters and two clusters written at guest 0.
fn qemu_image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let p = path.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            p,
            "1M",
        ],
    );
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 8192", p]);
    path
}

fn be64(path: &Path, at: u64) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at as usize..at as usize + 8]);
    u64::from_be_bytes(b)
}

fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn open_err(path: &Path) -> Error {
    match image::open_layer(path, Some(Format::Qcow2), OpenMode::default()) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

fn assert_names(e: &Error, path: &Path, field: &str, offset: u64) {
    assert_eq!(e.path(), Some(path), "{e}");
    assert!(
        e.field().is_some_and(|f| f.contains(field)),
        "field {field:?} expected: {e}"
    );
    assert_eq!(e.offset(), Some(offset), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(path.to_str().unwrap()) && text.contains(field),
        "{text}"
    );
}

/// Where the L2 table of guest cluster 0 lives.
fn first_l2(path: &Path) -> u64 {
    be64(path, be64(path, 40)) & 0x00ff_ffff_ffff_fe00
}

#[test]
fn truncated_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("short.qcow2");
    std::fs::write(&path, b"QFI\xfb\0\0\0\x03").unwrap();
    let e = open_err(&path);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_names(&e, &path, "header", 0);
    // A v3 header cut after the v2 part.
    let full = qemu_image(dir.path(), "full.qcow2");
    let bytes = std::fs::read(&full).unwrap();
    std::fs::write(&path, &bytes[..90]).unwrap();
    assert_names(&open_err(&path), &path, "header_length", 100);
}

#[test]
fn bad_magic_and_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "magic.qcow2");
    patch(&path, 0, b"QFI\0");
    assert_names(&open_err(&path), &path, "magic", 0);
    let path = qemu_image(dir.path(), "version.qcow2");
    patch(&path, 4, &4u32.to_be_bytes());
    let e = open_err(&path);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_names(&e, &path, "version", 4);
}

#[test]
fn absurd_table_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, u64, Vec<u8>)] = &[
        ("cluster_bits", 20, 30u32.to_be_bytes().to_vec()),
        ("cluster_bits", 20, 8u32.to_be_bytes().to_vec()),
        ("l1_size", 36, 0x7fff_ffffu32.to_be_bytes().to_vec()),
        ("l1_size", 36, 0u32.to_be_bytes().to_vec()),
        (
            "refcount_table_clusters",
            56,
            u32::MAX.to_be_bytes().to_vec(),
        ),
        (
            "refcount_table_clusters",
            56,
            5000u32.to_be_bytes().to_vec(),
        ),
        ("size", 24, (u64::MAX - 511).to_be_bytes().to_vec()),
        ("nb_snapshots", 60, u32::MAX.to_be_bytes().to_vec()),
        ("l1_table_offset", 40, 0x1234u64.to_be_bytes().to_vec()),
        (
            "refcount_table_offset",
            48,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        ("refcount_order", 96, 7u32.to_be_bytes().to_vec()),
        ("header_length", 100, 0xffffu32.to_be_bytes().to_vec()),
        ("backing_file_size", 16, 5000u32.to_be_bytes().to_vec()),
    ];
    for (i, (field, at, bytes)) in cases.iter().enumerate() {
        let path = qemu_image(dir.path(), &format!("absurd{i}.qcow2"));
        if *field == "backing_file_size" {
            patch(&path, 8, &512u64.to_be_bytes());
        }
        patch(&path, *at, bytes);
        let e = open_err(&path);
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert_names(&e, &path, field, *at);
    }
}

#[test]
fn l1_entry_past_the_end_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "l1.qcow2");
    let l1 = be64(&path, 40);
    patch(&path, l1, &((1u64 << 30) | 1 << 63).to_be_bytes());
    assert_names(&open_err(&path), &path, "L1 entry 0", l1);
    // Pointing at the L1 table itself.
    let path = qemu_image(dir.path(), "l1-self.qcow2");
    patch(&path, l1, &(l1 | 1 << 63).to_be_bytes());
    let e = open_err(&path);
    assert_names(&e, &path, "L1 entry 0", l1);
    assert!(e.to_string().contains("L1 table"), "{e}");
}

fn read_err(path: &Path, offset: u64) -> Error {
    let image = open_ro(path);
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, offset).unwrap_err()
}

#[test]
fn l2_entries_past_eof_or_into_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "past.qcow2");
    let l2 = first_l2(&path);
    let field = format!("L2 entry 1 of L2 table at {l2:#x}");
    patch(&path, l2 + 8, &((1u64 << 30) | 1 << 63).to_be_bytes());
    let e = read_err(&path, 4096);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert_names(&e, &path, &field, l2 + 8);
    assert!(e.to_string().contains("past the end"), "{e}");

    let path = qemu_image(dir.path(), "into-l1.qcow2");
    let l1 = be64(&path, 40);
    patch(&path, l2 + 8, &(l1 | 1 << 63).to_be_bytes());
    let e = read_err(&path, 4096);
    assert_names(&e, &path, &field, l2 + 8);
    assert!(e.to_string().contains("L1 table"), "{e}");

    let path = qemu_image(dir.path(), "into-refcount-table.qcow2");
    let rt = be64(&path, 48);
    patch(&path, l2 + 8, &(rt | 1 << 63).to_be_bytes());
    let e = read_err(&path, 4096);
    assert_names(&e, &path, &field, l2 + 8);
    assert!(e.to_string().contains("refcount table"), "{e}");

    // A compressed descriptor pointing into the header cluster.
    let path = qemu_image(dir.path(), "into-header.qcow2");
    patch(&path, l2 + 8, &((1u64 << 62) | 16).to_be_bytes());
    let e = read_err(&path, 4096);
    assert_names(&e, &path, &field, l2 + 8);
    assert!(e.to_string().contains("header"), "{e}");

    let path = qemu_image(dir.path(), "misaligned.qcow2");
    patch(&path, l2 + 8, &((l2 + 512) | 1 << 63).to_be_bytes());
    let e = read_err(&path, 4096);
    assert_names(&e, &path, &field, l2 + 8);
    assert!(e.to_string().contains("aligned"), "{e}");
}

#[test]
fn overlapping_clusters_are_found_by_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "overlap.qcow2");
    let l2 = first_l2(&path);
    let entry0 = be64(&path, l2);
    let cluster = (entry0 & 0x00ff_ffff_ffff_fe00) / 4096;
    patch(&path, l2 + 8, &entry0.to_be_bytes());
    let layer = image::open_layer(&path, None, OpenMode::read_only()).unwrap();
    let report = layer.check().unwrap();
    let finding = report
        .corruptions
        .iter()
        .find(|f| f.field == format!("refcount of cluster {cluster}"))
        .unwrap_or_else(|| panic!("no corruption for cluster {cluster}: {report:?}"));
    assert_eq!(finding.offset, cluster * 4096);
    assert!(finding.message.contains("references 2"), "{finding:?}");
    // The COPIED flag with a refcount of 1 but two references; the orphan leaks.
    assert_eq!(report.leaks.len(), 1, "{report:?}");
    // qemu-img agrees: exit code 2 means corruptions.
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .expect("qemu-img is required");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn refused_features() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(u64, u64, &str)] = &[
        (32, 1 << 32, "encrypted"),
        (72, 1 << 2, "external data file"),
        (72, 1 << 4, "extended L2"),
        (72, 1 << 10, "unknown incompatible"),
    ];
    for (i, (at, value, words)) in cases.iter().enumerate() {
        let path = qemu_image(dir.path(), &format!("feature{i}.qcow2"));
        if *at == 32 {
            patch(&path, 32, &1u32.to_be_bytes());
        } else {
            patch(&path, *at, &value.to_be_bytes());
        }
        let e = open_err(&path);
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        let field = if *at == 32 {
            "crypt_method"
        } else {
            "incompatible_features"
        };
        assert_names(&e, &path, field, *at);
        assert!(e.to_string().contains(words), "{e}");
    }
    // qemu's own encrypted images are refused the same way.
    let path = dir.path().join("luks.qcow2");
    let p = path.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            p,
            "1M",
        ],
    );
    let e = open_err(&path);
    assert_names(&e, &path, "crypt_method", 32);
}

#[test]
fn corrupt_bit_refuses_writes_but_serves_reads() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "corrupt-bit.qcow2");
    patch(&path, 72, &2u64.to_be_bytes());
    let image = Image::open(&path, ImageOptions::default()).unwrap();
    let mut buf = vec![0u8; 8192];
    image.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
    // Allocated data, unallocated space and discard: all refused.
    for result in [
        image.write_at(&[1; 512], 0),
        image.write_at(&[1; 512], 500_000),
        image.discard(0, 4096),
        image.top().resize(2 << 20),
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
        assert_names(&e, &path, "incompatible_features", 72);
        assert!(e.to_string().contains("corrupt"), "{e}");
    }
    assert_eq!(image.top().details()["corrupt"], true);
    drop(image);
    assert_eq!(be64(&path, 72), 2, "the header is left alone");
}

#[test]
fn dirty_image_is_repaired_on_a_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = qemu_image(dir.path(), "dirty.qcow2");
    // Lose the refcount of a data cluster, as a crash with lazy refcounts can.
    let l2 = first_l2(&path);
    let data = be64(&path, l2) & 0x00ff_ffff_ffff_fe00;
    let block = be64(&path, be64(&path, 48));
    patch(&path, block + 2 * (data / 4096), &0u16.to_be_bytes());
    patch(&path, 72, &1u64.to_be_bytes());
    {
        let image = Image::open(&path, ImageOptions::default()).unwrap();
        let report = image.top().check().unwrap();
        assert!(
            report.corruptions.is_empty() && report.leaks.is_empty(),
            "{report:?}"
        );
        // A new allocation must not reuse the cluster that lost its count.
        image.write_at(&[7; 4096], 64 * 1024).unwrap();
        let mut buf = vec![0u8; 8192];
        image.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
    }
    assert_eq!(be64(&path, 72) & 1, 0, "dirty bit cleared");
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn create_with_backing(path: &Path, backing_name: &str, base: &Path) {
    image::create(
        path,
        Format::Qcow2,
        CreateOptions {
            size: 1 << 20,
            backing: Some(image::CreateBacking {
                name: backing_name.to_string(),
                format: Format::Raw,
                layer: image::open_layer(base, Some(Format::Raw), OpenMode::default()).unwrap(),
            }),
            options: BTreeMap::new(),
        },
    )
    .unwrap();
}

#[test]
fn missing_or_self_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let path = dir.path().join("orphan.qcow2");
    create_with_backing(&path, "base.raw", &base);
    std::fs::remove_file(&base).unwrap();
    let e = match Image::open(&path, ImageOptions::default()) {
        Ok(_) => panic!("opened without its backing file"),
        Err(e) => e,
    };
    assert_eq!(e.path(), Some(path.as_path()), "{e}");
    assert_eq!(e.field(), Some("backing file name"), "{e}");
    assert!(e.offset().is_some_and(|o| o >= 72), "{e}");
    assert!(e.to_string().contains("base.raw"), "{e}");

    // An image naming itself as its backing file.
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let path = dir.path().join("self.qcow2");
    create_with_backing(&path, "self.qcow2", &base);
    let e = match Image::open(&path, ImageOptions::default()) {
        Ok(_) => panic!("opened an image that backs itself"),
        Err(e) => e,
    };
    let name_offset = be64(&path, 8);
    assert_names(&e, &path, "backing file name", name_offset);
    assert!(e.to_string().contains("itself"), "{e}");
}

/// A small image with metadata everywhere: 512-byte clusters, data, a snapshot, a backing
/// name; its first clusters are then damaged at random.
fn fuzz_seed() -> &'static [u8] {
    static SEED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SEED.get_or_init(make_fuzz_seed)
}

fn make_fuzz_seed() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.qcow2");
    let p = path.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            p,
            "256k",
        ],
    );
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x5a 0 40k", p]);
    run("qemu-img", &["snapshot", "-c", "s1", p]);
    run("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 4k 8k", p]);
    std::fs::read(&path).unwrap()
}

fn exercise(path: &Path) {
    let Ok(layer) = image::open_layer(path, Some(Format::Qcow2), OpenMode::default()) else {
        return;
    };
    let image = Image::from_layers(vec![layer]).unwrap();
    let size = image.virtual_size().min(1 << 20);
    let mut buf = vec![0u8; 70_000];
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(buf.len() as u64) as usize;
        let _ = image.read_at(&mut buf[..n], offset);
        offset += n as u64;
    }
    let _ = image.top().check();
    let _ = image.write_at(&[1; 3000], size / 3);
    let _ = image.discard(0, size.min(8192));
    let _ = image.flush();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random damage to the header, tables and snapshot metadata never panics.
    #[test]
    fn damaged_metadata_never_panics(
        flips in proptest::collection::vec((0usize..16384, any::<u8>()), 1..12)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = fuzz_seed().to_vec();
        for (at, value) in flips {
            let at = at % bytes.len();
            bytes[at] = value;
        }
        let path = dir.path().join("damaged.qcow2");
        std::fs::write(&path, &bytes).unwrap();
        exercise(&path);
    }
}

#[test]
fn unknown_backing_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let path = dir.path().join("fmt.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            path.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&path).unwrap();
    let at = (100..bytes.len() - 3)
        .find(|&i| &bytes[i..i + 3] == b"raw" && bytes[i - 4..i] == 3u32.to_be_bytes())
        .expect("backing format extension");
    patch(&path, at as u64, b"xyz");
    let e = open_err(&path);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_names(&e, &path, "backing format extension", at as u64);
    assert!(e.to_string().contains("xyz"), "{e}");
}
