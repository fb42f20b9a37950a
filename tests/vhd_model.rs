//! Property tests: random writes, reads and discards (sector-aligned and not) on fixed,
//! dynamic (with and without batmap, several block sizes) and differencing VHDs, against
//! an in-memory model of the disk; at the end the image is re-opened and compared whole,
//! `check` must be clean, and an independent parse of the file must find the batmap and
//! blocks consistent.

mod common;

#[path = "common/vhd_fixtures.rs"]
mod vhd_fixtures;

use std::path::Path;

use common::create_vhd;
use ferrotap::image::Image;
use proptest::prelude::*;
use vhd_fixtures::ParsedVhd;

const SIZE: u64 = 5 * (1 << 20) + 3 * 512;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Discard { offset: u64, len: u64 },
    Read { offset: u64, len: u64 },
    Reopen,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        (0..SIZE / 512).prop_map(|s| s * 512),
        (0..SIZE / 65536).prop_map(|s| s * 65536),
        0..SIZE,
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        (1..=512u64).prop_map(|s| s * 512),
        1..4096u64,
        1..400_000u64,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let clamp = |offset: u64, len: u64| (offset, len.min(SIZE - offset).max(1));
    prop_oneof![
        5 => (offset(), length(), any::<u8>()).prop_map(move |(o, l, seed)| {
            let (offset, len) = clamp(o, l);
            Op::Write { offset, len, seed }
        }),
        2 => (offset(), length()).prop_map(move |(o, l)| {
            let (offset, len) = clamp(o, l);
            Op::Discard { offset, len }
        }),
        2 => (offset(), length()).prop_map(move |(o, l)| {
            let (offset, len) = clamp(o, l);
            Op::Read { offset, len }
        }),
        1 => Just(Op::Reopen),
    ]
}

fn data(seed: u8, offset: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset + i) as u8).wrapping_mul(7) ^ seed | 1)
        .collect()
}

fn open(path: &Path) -> Image {
    common::open_rw(path)
}

/// Apply `ops` to the image at `path` and to `model`, checking every read; then re-open
/// and compare everything.
fn run(path: &Path, model: &mut [u8], ops: &[Op]) -> Result<(), TestCaseError> {
    let mut image = open(path);
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let bytes = data(seed, offset, len);
                image.write_at(&bytes, offset).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&bytes);
            }
            Op::Discard { offset, len } => {
                image.discard(offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                image.read_at(&mut buf, offset).unwrap();
                prop_assert!(
                    buf == model[offset as usize..(offset + len) as usize],
                    "read {}+{} differs",
                    offset,
                    len
                );
            }
            Op::Reopen => {
                image.flush().unwrap();
                image = open(path);
            }
        }
    }
    image.flush().unwrap();
    let report = image.top().check().unwrap();
    prop_assert!(report.corruptions.is_empty(), "{:?}", report.corruptions);
    prop_assert!(report.leaks.is_empty(), "{:?}", report.leaks);
    drop(image);
    let image = open(path);
    let mut whole = vec![0u8; model.len()];
    image.read_at(&mut whole, 0).unwrap();
    prop_assert!(whole == model, "whole disk differs after re-open");
    Ok(())
}

/// A scratch directory on tmpfs: every block allocation syncs the file, which costs
/// nothing there, so many cases run in seconds.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    }
}

/// The parent of the differencing cases, made once and kept in memory (a static's scratch
/// directory would never be removed): a pattern everywhere except a discarded range that
/// reads as zeros. Writes the parent's file to `path` and returns the disk's contents.
fn write_parent(path: &Path) -> Vec<u8> {
    static TEMPLATE: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    let (file, model) = TEMPLATE.get_or_init(|| {
        let dir = scratch();
        let base = dir.path().join("base.vhd");
        create_vhd(&base, SIZE, &[("block_size", "131072")], None);
        let mut model = data(0x5a, 0, SIZE);
        let image = open(&base);
        image.write_at(&model, 0).unwrap();
        image.discard(SIZE / 2, 300_000).unwrap();
        model[(SIZE / 2) as usize..(SIZE / 2 + 300_000) as usize].fill(0);
        image.flush().unwrap();
        drop(image);
        (std::fs::read(&base).unwrap(), model)
    });
    std::fs::write(path, file).unwrap();
    model.clone()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fixed_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = scratch();
        let path = dir.path().join("f.vhd");
        create_vhd(&path, SIZE, &[("subformat", "fixed")], None);
        let mut model = vec![0u8; SIZE as usize];
        run(&path, &mut model, &ops)?;
    }

    #[test]
    fn dynamic_with_batmap_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = scratch();
        let path = dir.path().join("d.vhd");
        create_vhd(&path, SIZE, &[("block_size", "65536")], None);
        let mut model = vec![0u8; SIZE as usize];
        run(&path, &mut model, &ops)?;
        ParsedVhd::parse(&path).assert_consistent();
    }

    #[test]
    fn dynamic_without_batmap_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = scratch();
        let path = dir.path().join("d.vhd");
        create_vhd(&path, SIZE, &[("batmap", "off")], None);
        let mut model = vec![0u8; SIZE as usize];
        run(&path, &mut model, &ops)?;
        let parsed = ParsedVhd::parse(&path);
        parsed.assert_consistent();
        prop_assert!(parsed.batmap.is_none());
    }

    #[test]
    fn differencing_chain_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = scratch();
        let base = dir.path().join("base.vhd");
        let child = dir.path().join("child.vhd");
        let mut model = write_parent(&base);
        create_vhd(&child, 0, &[("block_size", "65536")], Some(&base));
        run(&child, &mut model, &ops)?;
        ParsedVhd::parse(&child).assert_consistent();
        ParsedVhd::parse(&base).assert_consistent();
    }
}

/// Writers filling interleaved sectors of the same blocks (so bitmaps change under the
/// readers' feet) while readers map and read without locks: every sector a reader sees is
/// either still zero or its final bytes, and once the writers are done every sector reads
/// back (a stale bitmap left in the cache would hide some).
#[test]
fn concurrent_writers_and_lock_free_readers() {
    let dir = scratch();
    let path = dir.path().join("c.vhd");
    let size: u64 = 2 << 20;
    create_vhd(&path, size, &[("block_size", "65536")], None);
    let image = open(&path);
    let sectors = size / 512;
    let writers = 3u64;
    let sector_bytes = |s: u64| data((s % 251) as u8, s * 512, 512);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let mut writer_threads = Vec::new();
        for w in 0..writers {
            let image = &image;
            writer_threads.push(scope.spawn(move || {
                // A scattered order: blocks are allocated and bitmaps grown in turn.
                let mut order: Vec<u64> = (0..sectors).filter(|s| s % writers == w).collect();
                order.sort_by_key(|s| (s * 7919) % sectors);
                for s in order {
                    image.write_at(&sector_bytes(s), s * 512).unwrap();
                }
            }));
        }
        for _ in 0..2 {
            let image = &image;
            let done = &done;
            scope.spawn(move || {
                let mut buf = vec![0u8; size as usize];
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    image.read_at(&mut buf, 0).unwrap();
                    for s in 0..sectors {
                        let got = &buf[(s * 512) as usize..((s + 1) * 512) as usize];
                        assert!(
                            got.iter().all(|&b| b == 0) || got == sector_bytes(s).as_slice(),
                            "sector {s} torn or wrong"
                        );
                    }
                }
            });
        }
        for writer in writer_threads {
            writer.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    });
    let mut whole = vec![0u8; size as usize];
    image.read_at(&mut whole, 0).unwrap();
    for s in 0..sectors {
        assert_eq!(
            &whole[(s * 512) as usize..((s + 1) * 512) as usize],
            sector_bytes(s).as_slice(),
            "sector {s}"
        );
    }
    let report = image.top().check().unwrap();
    assert!(
        report.corruptions.is_empty() && report.leaks.is_empty(),
        "{report:?}"
    );
    drop(image);
    ParsedVhd::parse(&path).assert_consistent();
}
