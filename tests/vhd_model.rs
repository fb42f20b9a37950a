//! Property tests: random writes, reads and discards (sector-aligned and not) on fixed,
//! dynamic (with and without batmap, several block sizes) and differencing VHDs, against
//! an in-memory model of the disk; at the end the image is re-opened and compared whole,
//! `check` must be clean, and an independent parse of the file must find the batmap and
//! blocks consistent.

#[path = "common/vhd_fixtures.rs"]
mod vhd_fixtures;

use std::collections::BTreeMap;
use std::path::Path;

use ferrotap::image::{
    self, open_layer, CreateBacking, CreateOptions, Format, Image, ImageOptions, OpenMode,
};
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

fn create(path: &Path, size: u64, opts: &[(&str, &str)], parent: Option<&Path>) {
    let backing = parent.map(|p| CreateBacking {
        name: p.to_string_lossy().into_owned(),
        format: Format::Vhd,
        layer: open_layer(
            p,
            None,
            OpenMode {
                read_only: true,
                direct: false,
            },
        )
        .unwrap(),
    });
    image::create(
        path,
        Format::Vhd,
        CreateOptions {
            size,
            backing,
            options: opts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        },
    )
    .unwrap();
}

fn open(path: &Path) -> Image {
    Image::open(path, ImageOptions::default()).unwrap()
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

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fixed_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.vhd");
        create(&path, SIZE, &[("subformat", "fixed")], None);
        let mut model = vec![0u8; SIZE as usize];
        run(&path, &mut model, &ops)?;
    }

    #[test]
    fn dynamic_with_batmap_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        create(&path, SIZE, &[("block_size", "65536")], None);
        let mut model = vec![0u8; SIZE as usize];
        run(&path, &mut model, &ops)?;
        ParsedVhd::parse(&path).assert_consistent();
    }

    #[test]
    fn dynamic_without_batmap_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        create(&path, SIZE, &[("batmap", "off")], None);
        let mut model = vec![0u8; SIZE as usize];
        run(&path, &mut model, &ops)?;
        let parsed = ParsedVhd::parse(&path);
        parsed.assert_consistent();
        prop_assert!(parsed.batmap.is_none());
    }

    #[test]
    fn differencing_chain_matches_model(ops in prop::collection::vec(op(), 1..24)) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let child = dir.path().join("child.vhd");
        create(&base, SIZE, &[("block_size", "131072")], None);
        let mut model = data(0x5a, 0, SIZE);
        {
            let image = open(&base);
            image.write_at(&model, 0).unwrap();
            // Some of the parent reads as zeros: unallocated and discarded ranges.
            image.discard(SIZE / 2, 300_000).unwrap();
            model[(SIZE / 2) as usize..(SIZE / 2 + 300_000) as usize].fill(0);
            image.flush().unwrap();
        }
        create(&child, 0, &[("block_size", "65536")], Some(&base));
        run(&child, &mut model, &ops)?;
        ParsedVhd::parse(&child).assert_consistent();
        ParsedVhd::parse(&base).assert_consistent();
    }
}
