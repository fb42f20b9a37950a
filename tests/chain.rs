//! Chains of mixed formats: reads fall through to parents, writes copy up into the top,
//! parents stay untouched; checked against an in-memory model, against qemu-img for the
//! chains qemu can read, and for loops and depth.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{open_ro, open_rw, read_all, run_ok};
use ferrotap::error::ErrorKind;
use ferrotap::image::{
    self, CreateBacking, CreateOptions, Format, Image, ImageOptions, MAX_CHAIN_DEPTH,
};
use proptest::prelude::*;

const DISK_SIZE: u64 = 6 << 20;

fn layer_options(format: Format) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    // Small qcow2 clusters exercise L2 and refcount growth within a small disk.
    if format == Format::Qcow2 {
        options.insert("cluster_size".to_string(), "4096".to_string());
    }
    options
}

/// Create `path` as `format`, on `backing` when given (recorded by file name, relative).
fn create_layer(path: &Path, format: Format, size: u64, backing: Option<(&Path, Format)>) {
    let backing = backing.map(|(parent, parent_format)| {
        let name = parent.file_name().unwrap().to_string_lossy();
        CreateBacking::open(&name, parent, Some(parent_format)).unwrap()
    });
    let options = CreateOptions {
        options: layer_options(format),
        ..CreateOptions::new(size)
    };
    image::create(path, format, options.with_backing(backing)).unwrap();
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    // xorshift: cheap, deterministic, never all-zero.
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, seed: u64 },
    Discard { offset: u64, len: u64 },
    Read { offset: u64, len: usize },
    Flush,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![
        0..DISK_SIZE,
        (0..DISK_SIZE / 512).prop_map(|s| s * 512),
        // Near block and cluster boundaries, where copy-up splits.
        (1..3u64, 0..1024u64).prop_map(|(b, d)| (b * (2 << 20)).saturating_sub(d)),
    ];
    let len = prop_oneof![1..4096usize, 4096..300_000usize];
    prop_oneof![
        4 => (offset.clone(), len.clone(), any::<u64>()).prop_map(|(offset, len, seed)| Op::Write { offset, len, seed }),
        2 => (offset.clone(), len.clone()).prop_map(|(offset, len)| Op::Discard { offset, len: len as u64 }),
        2 => (offset, len).prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => Just(Op::Flush),
    ]
}

/// Apply `ops` to `image` and to `model`, checking every read against the model.
fn run_ops(image: &Image, model: &mut [u8], ops: &[Op]) {
    let size = model.len() as u64;
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let len = len.min((size - offset.min(size)) as usize);
                if len == 0 {
                    continue;
                }
                let data = pattern(seed, len);
                image.write_at(&data, offset).unwrap();
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            Op::Discard { offset, len } => {
                let len = len.min(size - offset.min(size));
                if len == 0 {
                    continue;
                }
                image.discard(offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Read { offset, len } => {
                let len = len.min((size - offset.min(size)) as usize);
                let mut buf = vec![0xeeu8; len];
                image.read_at(&mut buf, offset).unwrap();
                assert!(
                    buf == model[offset as usize..offset as usize + len],
                    "read {offset}+{len} differs from the model"
                );
            }
            Op::Flush => image.flush().unwrap(),
        }
    }
}

fn format_strategy(formats: &'static [Format]) -> impl Strategy<Value = Format> {
    proptest::sample::select(formats)
}

fn file_name(depth: usize, format: Format) -> String {
    let ext = match format {
        Format::Raw => "img",
        Format::Vhd => "vhd",
        Format::Qcow2 => "qcow2",
    };
    format!("layer{depth}.{ext}")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Build a chain bottom-up, writing into each layer while it is the top; at the end the
    /// top reads as the model, survives a reopen, and every parent still reads as it did
    /// when its child was made on it.
    #[test]
    fn mixed_chain_matches_model(
        formats in (
            format_strategy(&[Format::Raw, Format::Vhd, Format::Qcow2]),
            proptest::collection::vec(format_strategy(&[Format::Vhd, Format::Qcow2]), 1..=3),
        )
            .prop_map(|(base, uppers)| std::iter::once(base).chain(uppers).collect::<Vec<_>>())
            .prop_filter(
                "a differencing VHD records no parent format: its parent is VHD or raw",
                |chain| !chain.windows(2).any(|w| w == [Format::Qcow2, Format::Vhd]),
            ),
        layer_ops in proptest::collection::vec(proptest::collection::vec(op_strategy(), 1..16), 4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = vec![0u8; DISK_SIZE as usize];
        let mut frozen: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        let mut below: Option<(PathBuf, Format)> = None;
        for (depth, &format) in formats.iter().enumerate() {
            let path = dir.path().join(file_name(depth, format));
            create_layer(&path, format, DISK_SIZE, below.as_ref().map(|(p, f)| (p.as_path(), *f)));
            let image = open_rw(&path);
            prop_assert_eq!(image.layers().len(), depth + 1);
            prop_assert_eq!(read_all(&image), model.clone(), "new layer {} must read as its parent", depth);
            run_ops(&image, &mut model, &layer_ops[depth]);
            image.flush().unwrap();
            drop(image);
            frozen.push((path.clone(), model.clone()));
            below = Some((path, format));
        }
        let (top, _) = frozen.last().unwrap().clone();
        prop_assert_eq!(read_all(&open_rw(&top)), model.clone(), "top after reopen");
        for (path, expected) in &frozen {
            let alone = Image::open(path, ImageOptions { read_only: true, ..ImageOptions::default() }).unwrap();
            prop_assert!(read_all(&alone) == *expected, "{} changed after its child was made", path.display());
        }
    }
}

/// Run a command, panicking with its output when it fails.
fn run(cmd: &mut Command) -> Vec<u8> {
    run_ok(cmd).stdout
}

/// qemu reads qcow2 over raw and over a standalone VHD; what ferrotap wrote through the
/// chain must be what qemu-img reads from it.
#[test]
fn qemu_reads_chains_ferrotap_wrote() {
    for base_format in [Format::Raw, Format::Vhd, Format::Qcow2] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join(file_name(0, base_format));
        create_layer(&base, base_format, DISK_SIZE, None);
        let mut model = vec![0u8; DISK_SIZE as usize];
        {
            let image = open_rw(&base);
            for (i, offset) in [0u64, 1 << 20, (2 << 20) - 700, 5 << 20]
                .into_iter()
                .enumerate()
            {
                let data = pattern(i as u64 + 1, 150_000);
                image.write_at(&data, offset).unwrap();
                model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            }
            image.flush().unwrap();
        }
        let mid = dir.path().join("mid.qcow2");
        create_layer(&mid, Format::Qcow2, DISK_SIZE, Some((&base, base_format)));
        let top = dir.path().join("top.qcow2");
        create_layer(&top, Format::Qcow2, DISK_SIZE, Some((&mid, Format::Qcow2)));
        {
            let image = open_rw(&mid);
            let data = pattern(99, 70_000);
            image.write_at(&data, 1_000_000).unwrap();
            model[1_000_000..1_070_000].copy_from_slice(&data);
        }
        {
            let image = open_rw(&top);
            let data = pattern(7, 9000);
            image.write_at(&data, 4_000_123).unwrap();
            model[4_000_123..4_009_123].copy_from_slice(&data);
            image.discard(5 << 20, 4096).unwrap();
            model[5 << 20..(5 << 20) + 4096].fill(0);
            image.flush().unwrap();
            assert!(
                read_all(&image) == model,
                "ferrotap reads its own chain ({base_format})"
            );
        }
        let flat = dir.path().join("flat.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&top)
            .arg(&flat));
        let qemu_view = std::fs::read(&flat).unwrap();
        assert!(
            qemu_view == model,
            "qemu-img reads the chain on {base_format} as the model"
        );
        run(Command::new("qemu-img").args(["check"]).arg(&top));
    }
}

fn qemu_create_unsafe(path: &Path, backing: &str) {
    run(Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "qcow2",
        ])
        .arg(path)
        .arg("1M"));
}

#[test]
fn loops_in_the_chain_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_create_unsafe(&a, "b.qcow2");
    qemu_create_unsafe(&b, "a.qcow2");
    let err = Image::open(&a, ImageOptions::default())
        .map(drop)
        .expect_err("a loop must not open");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("loops back to"), "{err}");
    // Named by the file whose backing field closes the loop, with that field's offset.
    assert_eq!(err.path(), Some(b.as_path()), "{err}");
    assert_eq!(err.field(), Some("backing file name"), "{err}");
    assert!(err.offset().is_some(), "{err}");

    let selfish = dir.path().join("self.qcow2");
    qemu_create_unsafe(&selfish, "self.qcow2");
    let err = Image::open(&selfish, ImageOptions::default())
        .map(drop)
        .expect_err("a self-loop must not open");
    // The qcow2 layer itself spots a backing name that is its own file.
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    assert!(err.to_string().contains("self.qcow2"), "{err}");
}

#[test]
fn chains_deeper_than_the_bound_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let name = |i: usize| format!("l{i}.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(dir.path().join(name(0)))
        .arg("1M"));
    for i in 1..=MAX_CHAIN_DEPTH {
        qemu_create_unsafe(&dir.path().join(name(i)), &name(i - 1));
    }
    // Exactly the bound opens; one more layer does not.
    let at_bound = Image::open(
        &dir.path().join(name(MAX_CHAIN_DEPTH - 1)),
        ImageOptions::default(),
    )
    .unwrap();
    assert_eq!(at_bound.layers().len(), MAX_CHAIN_DEPTH);
    let err = Image::open(
        &dir.path().join(name(MAX_CHAIN_DEPTH)),
        ImageOptions::default(),
    )
    .map(drop)
    .expect_err("too deep");
    assert!(err.to_string().contains("deeper than"), "{err}");
}

#[test]
fn missing_parent_names_the_child_and_the_candidates() {
    let dir = tempfile::tempdir().unwrap();
    let child = dir.path().join("child.qcow2");
    qemu_create_unsafe(&child, "gone.qcow2");
    let err = Image::open(&child, ImageOptions::default())
        .map(drop)
        .expect_err("no parent");
    let text = err.to_string();
    assert!(
        text.contains("child.qcow2") && text.contains("gone.qcow2"),
        "{text}"
    );
    assert_eq!(err.field(), Some("backing file name"), "{err}");
    assert!(err.offset().is_some(), "{err}");
}

#[test]
fn parents_are_opened_read_only_and_the_top_can_be() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    create_layer(&base, Format::Vhd, 1 << 20, None);
    let top = dir.path().join("top.qcow2");
    create_layer(&top, Format::Qcow2, 1 << 20, Some((&base, Format::Vhd)));
    let image = open_rw(&top);
    assert!(!image.read_only());
    assert!(image.layers()[1].file().read_only());
    let ro = Image::open(
        &top,
        ImageOptions {
            read_only: true,
            ..ImageOptions::default()
        },
    )
    .unwrap();
    let err = ro.write_at(&[1; 512], 0).map(drop).expect_err("read-only");
    assert_eq!(err.kind(), ErrorKind::ReadOnly);
    // Out-of-range I/O is refused before it reaches any layer.
    let mut buf = [0u8; 512];
    assert_eq!(
        image
            .read_at(&mut buf, (1 << 20) - 100)
            .map(drop)
            .expect_err("past end")
            .kind(),
        ErrorKind::InvalidArgument
    );
}

/// VHD records no parent format, and blktap reads a null parent id as "raw parent"; probing
/// instead would let a guest turn its raw disk into a qcow2 naming any host file. So a VHD
/// child of a qcow2 parent is refused at creation with a clear error.
#[test]
fn vhd_on_qcow2_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    create_layer(&base, Format::Qcow2, 1 << 20, None);
    let err = image::create(
        &dir.path().join("top.vhd"),
        Format::Vhd,
        CreateOptions::new(1 << 20).with_backing(Some(
            CreateBacking::open("base.qcow2", &base, None).unwrap(),
        )),
    )
    .expect_err("VHD on qcow2");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(
        err.to_string().contains("top.vhd") && err.to_string().contains("qcow2"),
        "{err}"
    );
}

#[derive(serde::Deserialize)]
struct QemuMapEntry {
    start: u64,
    length: u64,
    depth: usize,
    present: bool,
    zero: bool,
}

/// `Image::block_status` (what `img map` and NBD block status use) agrees with
/// `qemu-img map` on depth, presence and zeros, granule by granule, for a qcow2 chain over
/// raw made and written by qemu. (Not for VHD: qemu reports a whole allocated block as
/// data, ignoring the sector bitmap that ferrotap honours.)
#[test]
fn block_status_agrees_with_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0u8; DISK_SIZE as usize]).unwrap();
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let qemu_io = |fmt: &str, path: &Path, cmd: &str| {
        run(Command::new("qemu-io")
            .args(["-f", fmt, "-c", cmd])
            .arg(path));
    };
    // A qcow2 overlay with 64 KiB clusters on `backing`, which qemu opens to size it.
    let overlay = |path: &Path, backing: &str, backing_format: &str| {
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"])
            .args(["-b", backing, "-F", backing_format])
            .arg(path));
    };
    overlay(&mid, "base.raw", "raw");
    overlay(&top, "mid.qcow2", "qcow2");
    qemu_io("raw", &base, "write -P 0x11 0 1M");
    qemu_io("qcow2", &mid, "write -P 0x22 512k 1M");
    qemu_io("qcow2", &mid, "write -z 3M 256k");
    qemu_io("qcow2", &top, "write -P 0x33 1M 128k");
    qemu_io("qcow2", &top, "write -z 4M 64k");

    for (path, granule) in [(&top, 65536u64), (&mid, 65536)] {
        let output = run(Command::new("qemu-img")
            .args(["map", "--output", "json"])
            .arg(path));
        let qemu: Vec<QemuMapEntry> = serde_json::from_slice(&output).unwrap();
        let image = open_ro(path);
        let mut checked = 0;
        for entry in &qemu {
            let mut offset = entry.start;
            while offset < entry.start + entry.length {
                let status = image.block_status(offset, granule).unwrap();
                let what = format!("{} at {offset}: ferrotap {status:?}", path.display());
                assert_eq!(status.depth.is_some(), entry.present, "present: {what}");
                if entry.present {
                    assert_eq!(status.depth, Some(entry.depth), "depth: {what}");
                    assert_eq!(status.zero, entry.zero, "zero: {what}");
                }
                offset += granule;
                checked += 1;
            }
        }
        assert_eq!(checked, DISK_SIZE / granule, "qemu's map covers the disk");
    }
}

/// `Layer::map_cached` (what the datapath's queue threads map with) answers only from
/// metadata in memory: on a freshly opened qemu image it declines where a VHD bitmap or a
/// qcow2 L2 table would have to be read, and wherever it answers it says what `map` says.
#[test]
fn map_cached_declines_cold_metadata_and_agrees_with_map() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let mut data = vec![0u8; DISK_SIZE as usize];
    // Data in every other 512 KiB, so the maps hold data, holes and partial blocks.
    for (i, chunk) in data.chunks_mut(512 << 10).enumerate().step_by(2) {
        chunk.fill(i as u8 | 1);
    }
    data[(3 << 20) + 4096..(3 << 20) + 8192].fill(0x77);
    std::fs::write(&raw, &data).unwrap();
    let vhd = dir.path().join("disk.vhd");
    let qcow2 = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "vpc", "-o", "subformat=dynamic"])
        .arg(&raw)
        .arg(&vhd));
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2", "-o", "cluster_size=65536"])
        .arg(&raw)
        .arg(&qcow2));
    // Partial VHD blocks need their bitmaps: qemu-io writes 4 KiB into a zero block.
    run(Command::new("qemu-io")
        .args(["-f", "vpc", "-c", "write -P 0x42 1M 4k"])
        .arg(&vhd));

    let step = 4096u64;
    for path in [&raw, &vhd, &qcow2] {
        let image = open_ro(path);
        let layer = image.top();
        let mut declined = 0;
        for pass in 0..2 {
            let mut offset = 0;
            while offset < DISK_SIZE {
                let len = (DISK_SIZE - offset).min(1 << 20);
                let cached = layer.map_cached(offset, len).unwrap();
                let mapped = layer.map(offset, len).unwrap();
                match cached {
                    Some(cached) => assert_eq!(cached, mapped, "{} at {offset}", path.display()),
                    None => {
                        assert_eq!(pass, 0, "{} at {offset}: map loaded it", path.display());
                        declined += 1;
                        // `map` just loaded what was missing.
                        assert_eq!(layer.map_cached(offset, len).unwrap(), Some(mapped));
                    }
                }
                offset += step;
            }
        }
        if path == &raw {
            assert_eq!(declined, 0, "raw has no metadata to miss");
        } else {
            assert!(
                declined > 0,
                "{}: nothing declined when cold",
                path.display()
            );
        }
    }
}
