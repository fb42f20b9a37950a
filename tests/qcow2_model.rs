//! qcow2 against an in-memory model: random writes, reads and discards (byte offsets,
//! aligned or not, spanning clusters), for v2 and v3, 512 B and 4 KiB clusters, with and
//! without a backing file; the image is re-opened and compared at the end, and
//! `qemu-img check` must find it clean after every case.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ferrotap::image::{self, CreateBacking, CreateOptions, Format, Image, ImageOptions};
use proptest::prelude::*;

/// Not a multiple of 4 KiB, so the last cluster is partly outside the disk.
const SIZE: u64 = 330_240;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u8 },
    Read { offset: u64, len: usize },
    Discard { offset: u64, len: u64 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SIZE, 1..40_000u64).prop_map(|(offset, len)| (offset, len.min(SIZE - offset)));
    // Cluster-aligned ranges too, so whole-cluster discards happen often.
    let aligned = (0..SIZE / 512, 1..80u64).prop_map(|(c, n)| {
        let offset = c * 512;
        (offset, (n * 512).min(SIZE - offset))
    });
    let any_range = prop_oneof![range, aligned];
    prop_oneof![
        4 => (any_range.clone(), any::<u8>()).prop_map(|((offset, len), seed)| Op::Write {
            offset,
            len: len as usize,
            seed
        }),
        2 => any_range.clone().prop_map(|(offset, len)| Op::Read { offset, len: len as usize }),
        2 => any_range.prop_map(|(offset, len)| Op::Discard { offset, len }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Backing {
    None,
    Raw,
    Qcow2,
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 0x80)
        .collect()
}

fn create_qcow2(path: &Path, opts: &[(&str, &str)], backing: Option<(&Path, Format)>) {
    let backing = backing.map(|(p, format)| {
        CreateBacking::open(p.file_name().unwrap().to_str().unwrap(), p, Some(format)).unwrap()
    });
    let options = CreateOptions::new(SIZE)
        .with_options(opts)
        .with_backing(backing);
    image::create(path, Format::Qcow2, options).unwrap();
}

fn qemu_check(path: &Path) -> Result<(), String> {
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .expect("qemu-img is required");
    if out.status.code() == Some(0) {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check exited {:?}: {}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn run_case(compat: &str, cluster_size: u64, backing: Backing, ops: &[Op]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.qcow2");
    let mut model = vec![0u8; SIZE as usize];
    let opts = [
        ("compat", compat),
        (
            "cluster_size",
            if cluster_size == 512 { "512" } else { "4096" },
        ),
    ];
    match backing {
        Backing::None => create_qcow2(&path, &opts, None),
        Backing::Raw => {
            let base = dir.path().join("base.raw");
            model = data(SIZE as usize, 0x41);
            std::fs::write(&base, &model).unwrap();
            create_qcow2(&path, &opts, Some((&base, Format::Raw)));
        }
        Backing::Qcow2 => {
            let base = dir.path().join("base.qcow2");
            create_qcow2(&base, &[("cluster_size", "4096")], None);
            let image = Image::open(&base, ImageOptions::default()).unwrap();
            let content = data(SIZE as usize / 2, 0x17);
            image.write_at(&content, 1000).unwrap();
            model[1000..1000 + content.len()].copy_from_slice(&content);
            drop(image);
            create_qcow2(&path, &opts, Some((&base, Format::Qcow2)));
        }
    }
    let open = || Image::open(&path, ImageOptions::default()).unwrap();
    let mut image = open();
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let bytes = data(len, seed);
                image.write_at(&bytes, offset).map_err(|e| e.to_string())?;
                model[offset as usize..offset as usize + len].copy_from_slice(&bytes);
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; len];
                image.read_at(&mut buf, offset).map_err(|e| e.to_string())?;
                if buf[..] != model[offset as usize..offset as usize + len] {
                    return Err(format!("read {offset}+{len} differs from the model"));
                }
            }
            Op::Discard { offset, len } => {
                image.discard(offset, len).map_err(|e| e.to_string())?;
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Reopen => {
                image.flush().map_err(|e| e.to_string())?;
                drop(image);
                image = open();
            }
        }
    }
    let report = image.top().check().map_err(|e| e.to_string())?;
    if !report.corruptions.is_empty() || !report.leaks.is_empty() {
        return Err(format!("ferrotap check: {report:?}"));
    }
    drop(image);
    let image = open();
    let mut all = vec![0u8; SIZE as usize];
    image.read_at(&mut all, 0).map_err(|e| e.to_string())?;
    if all != model {
        let i = all
            .iter()
            .zip(&model)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        return Err(format!("after reopen, byte {i:#x} differs from the model"));
    }
    drop(image);
    qemu_check(&path)?;
    // qemu's view of the chain agrees with the model too.
    let raw = dir.path().join("qemu-view.raw");
    let out = Command::new("qemu-img")
        .args([
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            raw.to_str().unwrap(),
        ])
        .output()
        .expect("qemu-img is required");
    if !out.status.success() {
        return Err(format!(
            "qemu-img convert: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if std::fs::read(&raw).unwrap() != model {
        return Err("qemu-img convert output differs from the model".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_io_matches_the_model(
        compat in prop_oneof![Just("0.10"), Just("1.1")],
        cluster_size in prop_oneof![Just(512u64), Just(4096u64)],
        backing in prop_oneof![Just(Backing::None), Just(Backing::Raw), Just(Backing::Qcow2)],
        ops in proptest::collection::vec(op(), 1..24),
    ) {
        let result = run_case(compat, cluster_size, backing, &ops);
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

/// 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB and the first
/// refcount table 2 MiB, so writing 6 MiB grows the table (blocks that count themselves).
#[test]
fn refcount_table_grows_past_what_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grow.qcow2");
    image::create(
        &path,
        Format::Qcow2,
        CreateOptions {
            size: 8 << 20,
            backing: None,
            options: [("cluster_size", "512"), ("refcount_bits", "64")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        },
    )
    .unwrap();
    let expected = data(6 << 20, 9);
    {
        let image = Image::open(&path, ImageOptions::default()).unwrap();
        for (i, chunk) in expected.chunks(100_000).enumerate() {
            image.write_at(chunk, i as u64 * 100_000).unwrap();
        }
        // Free some clusters and reuse them.
        image.discard(1 << 20, 1 << 20).unwrap();
        image.write_at(&expected[..4096], 1 << 20).unwrap();
        let report = image.top().check().unwrap();
        assert!(
            report.corruptions.is_empty() && report.leaks.is_empty(),
            "{report:?}"
        );
    }
    qemu_check(&path).unwrap();
    let info = Command::new("qemu-img")
        .args(["info", "--output=json", path.to_str().unwrap()])
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 64);
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0x89 0 1",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 1/1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Threads writing and reading their own interleaved ranges at once (the lock-free map
/// path racing allocations of neighbouring clusters in the same L2 tables).
/// With O_DIRECT too (on a disk directory: tmpfs may refuse it), where 512-byte clusters
/// share 4 KiB spans with metadata.
#[test]
fn concurrent_writers_and_readers_agree_with_the_model() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    for (compat, direct) in [
        ("0.10", false),
        ("1.1", false),
        ("0.10", true),
        ("1.1", true),
    ] {
        let path = dir.path().join(format!("threads-{compat}-{direct}.qcow2"));
        create_qcow2(&path, &[("compat", compat), ("cluster_size", "512")], None);
        let options = ImageOptions {
            direct,
            ..ImageOptions::default()
        };
        let image = Image::open(&path, options).unwrap();
        const THREADS: u64 = 4;
        const PIECE: u64 = 700;
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let image = &image;
                scope.spawn(move || {
                    let mut slot = t;
                    while (slot + 1) * PIECE <= SIZE {
                        let bytes = data(PIECE as usize, t as u8 + 1);
                        image.write_at(&bytes, slot * PIECE).unwrap();
                        let mut back = vec![0u8; PIECE as usize];
                        image.read_at(&mut back, slot * PIECE).unwrap();
                        assert_eq!(back, bytes);
                        slot += THREADS;
                    }
                });
            }
        });
        let mut all = vec![0u8; SIZE as usize];
        image.read_at(&mut all, 0).unwrap();
        for (slot, chunk) in all.chunks(PIECE as usize).enumerate() {
            if chunk.len() == PIECE as usize {
                assert_eq!(
                    chunk,
                    &data(PIECE as usize, (slot as u64 % THREADS) as u8 + 1)[..]
                );
            }
        }
        drop(image);
        qemu_check(&path).unwrap();
    }
}

/// More L2 tables than cache slots (64 KiB clusters: 128 slots, one table per 512 MiB):
/// tables are evicted and re-read, by one thread and by several at once.
#[test]
fn l2_cache_evicts_and_reloads_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wide.qcow2");
    const SPAN: u64 = 512 << 20;
    const TABLES: u64 = 300;
    image::create(
        &path,
        Format::Qcow2,
        CreateOptions {
            size: TABLES * SPAN,
            backing: None,
            options: BTreeMap::new(),
        },
    )
    .unwrap();
    let image = Image::open(&path, ImageOptions::default()).unwrap();
    let at = |t: u64| t * SPAN + (t % 7) * 65536 + 1000;
    for t in 0..TABLES {
        image.write_at(&data(3000, t as u8), at(t)).unwrap();
    }
    let verify = |image: &Image, order: &mut dyn Iterator<Item = u64>| {
        for t in order {
            let mut buf = vec![0u8; 3000];
            image.read_at(&mut buf, at(t)).unwrap();
            assert_eq!(buf, data(3000, t as u8), "table {t}");
        }
    };
    verify(&image, &mut (0..TABLES).rev());
    std::thread::scope(|scope| {
        for k in 0..4u64 {
            let image = &image;
            scope.spawn(move || {
                verify(image, &mut (0..TABLES).map(|t| (t * 37 + k * 11) % TABLES));
            });
        }
    });
    drop(image);
    qemu_check(&path).unwrap();
}
