//! qcow2 against real oracles: images qemu-img/qemu-io make are read back byte-identical
//! to `qemu-img convert -O raw`; images ferrotap makes and writes pass `qemu-img check`,
//! compare equal with `qemu-img compare`, and are read by qcowinfo and pyqcow.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{open_ro, open_rw, run_ok};
use ferrotap::image::{self, CreateBacking, CreateOptions, Format, Image, OpenMode};

fn run(program: &str, args: &[&str]) -> std::process::Output {
    run_ok(Command::new(program).args(args))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_io(path: &Path, fmt: &str, commands: &[String]) {
    let mut args = vec!["-f", fmt];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(s(path));
    run("qemu-io", &args);
}

/// The guest contents as qemu sees them.
fn qemu_raw(path: &Path) -> Vec<u8> {
    let out = path.with_extension("oracle.raw");
    run("qemu-img", &["convert", "-O", "raw", s(path), s(&out)]);
    let data = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    data
}

fn ferrotap_read(path: &Path) -> Vec<u8> {
    let image = open_ro(path);
    let mut buf = vec![0u8; image.virtual_size() as usize];
    // Read in odd-sized pieces so requests straddle clusters.
    let mut off = 0;
    while off < buf.len() {
        let n = 777_777.min(buf.len() - off);
        image.read_at(&mut buf[off..off + n], off as u64).unwrap();
        off += n;
    }
    buf
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!(
            "{what}: first difference at byte {i:#x}: {:#x} vs {:#x}",
            a[i], b[i]
        );
    }
}

fn qemu_check(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", s(path)])
        .output()
        .expect("qemu-img is required");
    assert!(
        out.status.code() == Some(0),
        "qemu-img check {} exited {:?}: {}{}",
        path.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create(path: &Path, size: u64, opts: &[(&str, &str)], backing: Option<(&Path, Format)>) {
    let backing = backing.map(|(p, format)| {
        CreateBacking::open(p.file_name().unwrap().to_str().unwrap(), p, Some(format)).unwrap()
    });
    let options = CreateOptions::new(size)
        .with_options(opts)
        .with_backing(backing);
    image::create(path, Format::Qcow2, options).unwrap();
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

#[test]
fn reads_qemu_images_of_every_compat_and_cluster_size() {
    let dir = tempfile::tempdir().unwrap();
    for compat in ["0.10", "1.1"] {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            let path = dir.path().join(format!("q-{compat}-{cs}.qcow2"));
            let size = 24u64 << 20;
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("compat={compat},cluster_size={cs}"),
                    s(&path),
                    &size.to_string(),
                ],
            );
            qemu_io(
                &path,
                "qcow2",
                &[
                    "write -P 0x5a 0 4096".into(),
                    format!("write -P 0x33 {} 70000", cs * 3 + 100),
                    "write -P 0x77 5000000 3000000".into(),
                    "write -P 0x5a 20971008 512".into(),
                    "write -z 5500000 1000000".into(),
                    format!("write -z {} {}", 16 << 20, 4 << 20),
                ],
            );
            let expected = qemu_raw(&path);
            assert_same(
                &ferrotap_read(&path),
                &expected,
                &path.display().to_string(),
            );
        }
    }
}

#[test]
fn reads_backing_chains_of_raw_vpc_and_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    for (base_fmt, ext) in [("raw", "raw"), ("vpc", "vhd"), ("qcow2", "qcow2")] {
        for compat in ["0.10", "1.1"] {
            let base = dir.path().join(format!("base-{compat}.{ext}"));
            run(
                "qemu-img",
                &["create", "-q", "-f", base_fmt, s(&base), &size.to_string()],
            );
            qemu_io(
                &base,
                base_fmt,
                &["write -P 0x11 0 8M".into(), "write -P 0x22 1M 1M".into()],
            );
            let top = dir.path().join(format!("top-{base_fmt}-{compat}.qcow2"));
            run(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("compat={compat},cluster_size=4096"),
                    "-b",
                    base.file_name().unwrap().to_str().unwrap(),
                    "-F",
                    base_fmt,
                    s(&top),
                ],
            );
            qemu_io(
                &top,
                "qcow2",
                &[
                    "write -P 0x5a 1000 10000".into(),
                    "write -P 0x66 3M 100000".into(),
                    "write -z 5M 64k".into(),
                ],
            );
            let expected = qemu_raw(&top);
            let got = ferrotap_read(&top);
            // vpc rounds sizes to its geometry; compare the qcow2's virtual size.
            assert_same(&got, &expected[..got.len()], &top.display().to_string());
        }
    }
}

fn compressed_source(dir: &Path) -> PathBuf {
    let raw = dir.join("source.raw");
    let mut data = vec![0u8; 6 << 20];
    for (i, chunk) in data.chunks_mut(65536).enumerate() {
        if i % 3 != 2 {
            let text = format!("cluster {i} compresses well; ");
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = text.as_bytes()[j % text.len()];
            }
        }
    }
    // Incompressible bytes too (qemu stores those uncompressed).
    let mut x = 0x1234_5678u32;
    for b in &mut data[(4 << 20)..(4 << 20) + 65536] {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&raw, &data).unwrap();
    raw
}

#[test]
fn reads_compressed_clusters_zlib_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let raw = compressed_source(dir.path());
    let expected = std::fs::read(&raw).unwrap();
    for (name, opts) in [
        ("zlib-64k", "cluster_size=65536"),
        ("zlib-4k", "cluster_size=4096"),
        ("zlib-v2", "compat=0.10,cluster_size=65536"),
        ("zstd-64k", "compression_type=zstd,cluster_size=65536"),
        ("zstd-2m", "compression_type=zstd,cluster_size=2M"),
    ] {
        let path = dir.path().join(format!("{name}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                opts,
                s(&raw),
                s(&path),
            ],
        );
        assert_same(&ferrotap_read(&path), &expected, name);
        // Overwrite parts of compressed clusters: the rest is copied out of them and
        // their references dropped.
        {
            let image = open_rw(&path);
            image.write_at(&pattern(1000, 7), 70000).unwrap();
            image.write_at(&pattern(65536 * 2, 9), 65536 * 5).unwrap();
            image.discard(65536 * 8, 65536).unwrap();
        }
        qemu_check(&path);
        assert_same(&ferrotap_read(&path), &qemu_raw(&path), name);
    }
}

#[test]
fn serves_the_active_state_of_an_image_with_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    for compat in ["0.10", "1.1"] {
        let path = dir.path().join(format!("snap-{compat}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat},cluster_size=4096"),
                s(&path),
                "4M",
            ],
        );
        qemu_io(&path, "qcow2", &["write -P 0x11 0 2M".into()]);
        let at_snapshot = qemu_raw(&path);
        run("qemu-img", &["snapshot", "-c", "s1", s(&path)]);
        qemu_io(
            &path,
            "qcow2",
            &[
                "write -P 0x22 100000 5000".into(),
                "write -P 0x33 3M 4096".into(),
            ],
        );
        assert_same(&ferrotap_read(&path), &qemu_raw(&path), "active state");
        // ferrotap writes over clusters the snapshot shares: they are copied first.
        let mut expected = qemu_raw(&path);
        {
            let image = open_rw(&path);
            let data = pattern(300_000, 3);
            image.write_at(&data, 12345).unwrap();
            expected[12345..12345 + data.len()].copy_from_slice(&data);
            image.discard(1 << 20, 8192).unwrap();
            expected[(1 << 20)..(1 << 20) + 8192].fill(0);
            assert_eq!(
                image.top().details()["snapshots"],
                serde_json::json!(1),
                "details count the snapshot"
            );
        }
        qemu_check(&path);
        assert_same(&qemu_raw(&path), &expected, "after ferrotap writes");
        let snap = dir.path().join("snap.raw");
        run(
            "qemu-img",
            &[
                "convert",
                "-l",
                "snapshot.name=s1",
                "-O",
                "raw",
                s(&path),
                s(&snap),
            ],
        );
        assert_same(
            &std::fs::read(&snap).unwrap(),
            &at_snapshot,
            "the snapshot is untouched",
        );
    }
}

/// Apply the same writes to a ferrotap image and a model; return the model.
fn write_workload(image: &Image, model: &mut [u8], cs: u64) {
    let size = model.len() as u64;
    let writes: Vec<(u64, usize, u8)> = vec![
        (0, 4096, 1),
        (cs - 100, 300, 2),
        (3 * cs + 17, (5 * cs) as usize, 3),
        (size / 2 + 1, 100_000, 4),
        (size - 5000, 5000, 5),
        (cs * 40, (cs * 2) as usize, 6),
    ];
    for (off, len, seed) in writes {
        let data = pattern(len, seed);
        image.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    for (off, len) in [(3 * cs + 17, 2 * cs), (cs * 40, cs), (size / 2 + 50, 10)] {
        image.discard(off, len).unwrap();
        model[off as usize..(off + len) as usize].fill(0);
    }
    image.flush().unwrap();
}

fn pyqcow_read(path: &Path) -> Option<Vec<u8>> {
    let script = "import pyqcow, sys\n\
                  f = pyqcow.file()\n\
                  f.open(sys.argv[1])\n\
                  sys.stdout.buffer.write(f.read_buffer(f.get_media_size()))\n";
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script, s(path)])
        .output()
        .expect("/usr/bin/python3 with pyqcow is required");
    out.status.success().then_some(out.stdout)
}

#[test]
fn images_ferrotap_writes_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("v2-64k", &[("compat", "0.10")]),
        ("v2-512", &[("compat", "0.10"), ("cluster_size", "512")]),
        ("v3-4k", &[("cluster_size", "4096")]),
        (
            "v3-512-rb1",
            &[("cluster_size", "512"), ("refcount_bits", "1")],
        ),
        (
            "v3-4k-rb4",
            &[("cluster_size", "4k"), ("refcount_bits", "4")],
        ),
        (
            "v3-4k-rb64",
            &[("cluster_size", "4096"), ("refcount_bits", "64")],
        ),
        (
            "v3-2m-rb8",
            &[("cluster_size", "2M"), ("refcount_bits", "8")],
        ),
        ("v3-lazy", &[("lazy_refcounts", "on")]),
        (
            "v3-prealloc",
            &[("preallocation", "metadata"), ("cluster_size", "4096")],
        ),
        ("v3-zstd", &[("compression_type", "zstd")]),
    ];
    for (name, opts) in cases {
        let path = dir.path().join(format!("{name}.qcow2"));
        let cs = opts
            .iter()
            .find(|(k, _)| *k == "cluster_size")
            .map_or(65536, |(_, v)| match *v {
                "4k" => 4096,
                "2M" => 2 << 20,
                v => v.parse().unwrap(),
            });
        // Room for the workload's writes at cluster multiples.
        let size = (6u64 << 20).max(44 * cs);
        create(&path, size, opts, None);
        let mut model = vec![0u8; size as usize];
        write_workload(&open_rw(&path), &mut model, cs);
        qemu_check(&path);
        let expected = dir.path().join(format!("{name}.expected"));
        std::fs::write(&expected, &model).unwrap();
        run(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                s(&path),
                s(&expected),
            ],
        );
        // libqcow 20201213 predates the compression type (incompatible bit 3), and
        // ignores the v3 zero flag, so pyqcow checks the data of v2 images only.
        if !name.contains("zstd") {
            let info = run("qcowinfo", &[s(&path)]);
            let text = String::from_utf8_lossy(&info.stdout);
            assert!(text.contains(&format!("({size} bytes)")), "{text}");
            let version = if name.starts_with("v2") { 2 } else { 3 };
            assert!(
                text.contains(&format!("Format version\t\t: {version}")),
                "{text}"
            );
        }
        if name.starts_with("v2") {
            let data = pyqcow_read(&path).unwrap_or_else(|| panic!("pyqcow cannot read {name}"));
            assert_same(&data, &model, &format!("pyqcow {name}"));
        }
        assert_same(&ferrotap_read(&path), &model, name);
    }
}

#[test]
fn images_with_backing_files_pass_qemu_img_check_and_compare() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let base_data = pattern(size as usize, 42);
    for (fmt, ext) in [("raw", "raw"), ("vpc", "vhd"), ("qcow2", "qcow2")] {
        let base = dir.path().join(format!("base.{ext}"));
        run(
            "qemu-img",
            &["create", "-q", "-f", fmt, s(&base), &size.to_string()],
        );
        let raw_src = dir.path().join("base-src.raw");
        std::fs::write(&raw_src, &base_data).unwrap();
        run(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                fmt,
                s(&raw_src),
                s(&base),
            ],
        );
        let base_size = qemu_raw(&base).len() as u64;
        for compat in ["0.10", "1.1"] {
            let top = dir.path().join(format!("top-{fmt}-{compat}.qcow2"));
            // Size 0: the backing file's size.
            create(
                &top,
                0,
                &[("compat", compat), ("cluster_size", "4096")],
                Some((&base, Format::parse(fmt).unwrap())),
            );
            let mut model = qemu_raw(&base);
            {
                let image = open_rw(&top);
                assert_eq!(image.virtual_size(), base_size);
                assert_eq!(image.layers().len(), 2);
                write_workload(&image, &mut model, 4096);
            }
            qemu_check(&top);
            let expected = dir.path().join("expected.raw");
            std::fs::write(&expected, &model).unwrap();
            run(
                "qemu-img",
                &["compare", "-f", "qcow2", "-F", "raw", s(&top), s(&expected)],
            );
            assert_same(&qemu_raw(&top), &model, &top.display().to_string());
            let info = run("qemu-img", &["info", "--output=json", s(&top)]);
            let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
            assert_eq!(info["backing-filename-format"], fmt);
        }
    }
}

#[test]
fn a_4_tib_image_works_past_2_tib() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.qcow2");
    let size = 4u64 << 40;
    create(&path, size, &[], None);
    let offsets = [(2u64 << 40) + 4096, (3u64 << 40) + 12345, size - 65536];
    {
        let image = open_rw(&path);
        assert_eq!(image.virtual_size(), size);
        for off in offsets {
            image.write_at(&[0x5a; 65536], off).unwrap();
        }
    }
    qemu_check(&path);
    let commands: Vec<String> = offsets
        .iter()
        .map(|off| format!("read -P 0x5a {off} 65536"))
        .collect();
    qemu_io(&path, "qcow2", &commands);
    // And 16 TiB and 1 PiB (2 MiB clusters) create and serve I/O.
    for (size, opts) in [
        (16u64 << 40, vec![]),
        (1u64 << 50, vec![("cluster_size", "2M")]),
    ] {
        let path = dir.path().join(format!("huge-{size}.qcow2"));
        create(&path, size, &opts, None);
        {
            let image = open_rw(&path);
            image.write_at(&[0x5a; 4096], size - 4096).unwrap();
        }
        qemu_check(&path);
        qemu_io(
            &path,
            "qcow2",
            &[format!("read -P 0x5a {} 4096", size - 4096)],
        );
    }
}

#[test]
fn create_refuses_absurd_sizes_and_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.qcow2");
    let attempt = |size: u64, opts: &[(&str, &str)]| {
        image::create(
            &path,
            Format::Qcow2,
            CreateOptions {
                size,
                backing: None,
                options: opts
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            },
        )
        .unwrap_err()
        .to_string()
    };
    assert!(attempt(1 << 62, &[("cluster_size", "512")]).contains("L1 table"));
    assert!(attempt(u64::MAX - 4096, &[]).contains("absurd"));
    assert!(attempt(1 << 20, &[("cluster_size", "1000")]).contains("power of two"));
    assert!(attempt(1 << 20, &[("cluster_size", "4M")]).contains("512 to 2M"));
    assert!(attempt(1 << 20, &[("compat", "0.10"), ("refcount_bits", "8")]).contains("16"));
    assert!(
        attempt(1 << 20, &[("compat", "0.10"), ("compression_type", "zstd")])
            .contains("compat=1.1")
    );
    assert!(attempt(1 << 20, &[("bogus", "1")]).contains("bogus"));
}

#[test]
fn details_report_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let path = dir.path().join("d.qcow2");
    create(
        &path,
        0,
        &[
            ("cluster_size", "4096"),
            ("refcount_bits", "8"),
            ("lazy_refcounts", "on"),
            ("compression_type", "zstd"),
        ],
        Some((&base, Format::Raw)),
    );
    let layer = image::open_layer(&path, None, OpenMode::default()).unwrap();
    let d = layer.details();
    assert_eq!(d["compat"], "1.1");
    assert_eq!(d["cluster-size"], 4096);
    assert_eq!(d["refcount-bits"], 8);
    assert_eq!(d["lazy-refcounts"], true);
    assert_eq!(d["dirty"], false);
    assert_eq!(d["corrupt"], false);
    assert_eq!(d["compression-type"], "zstd");
    assert_eq!(d["snapshots"], 0);
    assert_eq!(d["backing-format"], "raw");
    assert_eq!(layer.virtual_size(), 1 << 20);
    let info = run("qemu-img", &["info", "--output=json", s(&path)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zstd");
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 8);
    assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], true);
}

#[test]
fn resize_grows_and_relocates_the_l1_table_and_shrinks_only_unused_space() {
    let dir = tempfile::tempdir().unwrap();
    for compat in ["0.10", "1.1"] {
        let path = dir.path().join(format!("resize-{compat}.qcow2"));
        // 512-byte clusters: one L1 cluster holds 64 entries, covering 2 MiB.
        create(
            &path,
            1 << 20,
            &[("compat", compat), ("cluster_size", "512")],
            None,
        );
        let new_size = 100u64 << 20;
        {
            let image = open_rw(&path);
            image.write_at(&[0x5a; 5000], 1000).unwrap();
            image.top().resize(new_size).unwrap();
            let image = Image::from_layers(image.layers().to_vec()).unwrap();
            assert_eq!(image.virtual_size(), new_size);
            image.write_at(&[0x5a; 5000], new_size - 5000).unwrap();
            let e = image.top().resize(1 << 20).unwrap_err();
            assert!(e.to_string().contains("allocated"), "{e}");
            image.discard(new_size - 8192, 8192).unwrap();
            image.top().resize(new_size / 2).unwrap();
        }
        qemu_check(&path);
        let info = run("qemu-img", &["info", "--output=json", s(&path)]);
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], new_size / 2);
        qemu_io(&path, "qcow2", &["read -P 0x5a 1000 5000".into()]);
        let mut expected = vec![0u8; (new_size / 2) as usize];
        expected[1000..6000].fill(0x5a);
        assert_same(&ferrotap_read(&path), &expected, "after resize");
    }
}

#[test]
fn persistent_bitmaps_are_counted_and_dropped_on_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bitmaps.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&path),
            "8M",
        ],
    );
    qemu_io(&path, "qcow2", &["write -P 0x5a 0 1M".into()]);
    run("qemu-img", &["bitmap", "--add", s(&path), "b0"]);
    run(
        "qemu-img",
        &["bitmap", "--add", "-g", "65536", s(&path), "b1"],
    );
    // Set bits, so that bitmap data clusters exist.
    let merged = dir.path().join("src.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&merged), "8M"],
    );
    run("qemu-img", &["bitmap", "--add", s(&merged), "dirty"]);
    qemu_io(&merged, "qcow2", &["write 0 4M".into()]);
    run(
        "qemu-img",
        &[
            "bitmap",
            "--merge",
            "dirty",
            "-b",
            s(&merged),
            "-F",
            "qcow2",
            s(&path),
            "b0",
        ],
    );
    let info = run("qemu-img", &["info", "--output=json", s(&path)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let layer = image::open_layer(&path, None, OpenMode::read_only()).unwrap();
    let report = layer.check().unwrap();
    // Without counting the bitmaps' directory, tables and data, these would be leaks.
    assert!(
        report.corruptions.is_empty() && report.leaks.is_empty(),
        "{report:?}"
    );
    drop(layer);
    // A writer that does not maintain the bitmaps clears their auto-clear bit, so qemu
    // stops trusting them.
    {
        let image = open_rw(&path);
        image.write_at(&[1; 4096], 6 << 20).unwrap();
    }
    let header = std::fs::read(&path).unwrap();
    assert_eq!(&header[88..96], &[0u8; 8], "autoclear_features cleared");
    let info = run("qemu-img", &["info", "--output=json", s(&path)]);
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .is_none_or(|b| b.is_empty()));
}

/// A process that dies without closing: v3 images stay marked dirty (qemu and ferrotap
/// both rebuild the refcounts on the next writable open); v2 images can only leak the
/// clusters of one allocation batch, never reference a cluster counted as free.
#[test]
fn an_image_left_open_by_a_crash_is_repaired_or_only_leaks() {
    let dir = tempfile::tempdir().unwrap();
    let workload = |path: &Path| {
        let image = open_rw(path);
        image.write_at(&pattern(200_000, 1), 12345).unwrap();
        image.flush().unwrap();
        image.write_at(&pattern(70_000, 2), 1 << 20).unwrap();
        image.discard(20_000, 100_000).unwrap();
        // No close: neither the dirty bit nor the v2 reserve is cleaned up.
        std::mem::forget(image);
    };
    let mut expected = vec![0u8; 4 << 20];
    expected[12345..12345 + 200_000].copy_from_slice(&pattern(200_000, 1));
    expected[1 << 20..(1 << 20) + 70_000].copy_from_slice(&pattern(70_000, 2));
    expected[20_000..120_000].fill(0);
    for reopen_with in ["ferrotap", "qemu"] {
        let path = dir.path().join(format!("crash-v3-{reopen_with}.qcow2"));
        create(&path, 4 << 20, &[("cluster_size", "4096")], None);
        workload(&path);
        let header = std::fs::read(&path).unwrap();
        assert_eq!(header[79] & 1, 1, "dirty bit set while the image was open");
        if reopen_with == "ferrotap" {
            drop(open_rw(&path));
        } else {
            qemu_io(&path, "qcow2", &["read 0 512".into()]);
        }
        qemu_check(&path);
        assert_same(&qemu_raw(&path), &expected, reopen_with);
    }
    let path = dir.path().join("crash-v2.qcow2");
    create(
        &path,
        4 << 20,
        &[("compat", "0.10"), ("cluster_size", "4096")],
        None,
    );
    workload(&path);
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", s(&path)])
        .output()
        .unwrap();
    // 3: leaks only; never 2 (corruption).
    assert!(matches!(out.status.code(), Some(0 | 3)), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["leaks"].as_u64().unwrap_or(0) <= 16, "{report}");
    assert_same(&qemu_raw(&path), &expected, "v2 after a crash");
}

/// qemu with lazy refcounts killed mid-way (`qemu-io ... -c abort`) leaves a dirty image
/// whose refcounts are missing; ferrotap's writable open rebuilds them.
#[test]
fn a_dirty_lazy_refcounts_image_from_qemu_is_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lazy.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            s(&path),
            "4M",
        ],
    );
    let aborted = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "abort",
            s(&path),
        ])
        .output()
        .expect("qemu-io is required");
    assert!(!aborted.status.success(), "qemu-io abort kills qemu-io");
    let header = std::fs::read(&path).unwrap();
    assert_eq!(header[79] & 1, 1, "qemu left the dirty bit set");
    let broken = Command::new("qemu-img")
        .args(["check", s(&path)])
        .output()
        .unwrap();
    assert_eq!(
        broken.status.code(),
        Some(2),
        "refcounts are missing before repair"
    );
    {
        let image = open_rw(&path);
        assert!(image.top().check().unwrap().corruptions.is_empty());
        image.write_at(&[0x11; 4096], 2 << 20).unwrap();
    }
    qemu_check(&path);
    let mut expected = vec![0u8; 4 << 20];
    expected[..1 << 20].fill(0x5a);
    expected[2 << 20..(2 << 20) + 4096].fill(0x11);
    assert_same(&qemu_raw(&path), &expected, "after repair");
}
