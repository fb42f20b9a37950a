//! Hostile VHDs: truncated files, bad cookies and checksums, BAT entries past the end, into
//! metadata or over each other, absurd table and block sizes, a bad batmap, missing,
//! mismatched and cyclic parents. Each gives an error naming the file, the field and its
//! offset (damaged BAT entries when their block is read or written, and in `check`; the
//! rest of such a disk stays readable); none panics. A sweep of single-byte corruptions over the metadata checks that
//! nothing panics whatever the bytes say.

mod common;

#[path = "common/vhd_fixtures.rs"]
mod vhd_fixtures;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::create_vhd;
use ferrotap::error::{Error, ErrorKind};
use ferrotap::image::{Format, Image, ImageOptions};
use vhd_fixtures::{vhd_checksum, ParsedVhd};

const MIB: u64 = 1 << 20;

/// An 8 MiB dynamic VHD (2 MiB blocks, batmap) with blocks 0, 2 and 3 allocated, in
/// that order in the file.
fn sample(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    create_vhd(&path, 8 * MIB, &[], None);
    let image = Image::open(&path, ImageOptions::default()).unwrap();
    for block in [0u64, 2, 3] {
        image
            .write_at(&[0xab; 4096], block * 2 * MIB + 512)
            .unwrap();
    }
    image.flush().unwrap();
    path
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

/// Open as VHD (probing would take a file without a footer cookie for raw).
fn open_err(path: &Path) -> Error {
    match Image::open(path, vhd_options()) {
        Ok(_) => panic!("{} opened despite the corruption", path.display()),
        Err(e) => e,
    }
}

/// The error is Corrupt, names `path`, `field` and `offset`, and its message says so.
fn assert_names(err: &Error, path: &Path, field: &str, offset: u64) {
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_eq!(err.path(), Some(path), "{err}");
    assert_eq!(err.field(), Some(field), "{err}");
    assert_eq!(err.offset(), Some(offset), "{err}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains(field), "{text}");
    assert!(text.contains(&format!("{offset:#x}")), "{text}");
}

/// Block `block` of a sample has an untrusted BAT entry: reading or writing it fails naming
/// the entry, `check` reports it, and block 0 still reads.
fn assert_damaged_block(path: &Path, block: u64, why: &str) {
    let image = Image::open(path, vhd_options()).unwrap();
    let field = format!("BAT entry {block}");
    let offset = 1536 + 4 * block;
    let mut buf = vec![0u8; 4096];
    let err = image.read_at(&mut buf, block * 2 * MIB).unwrap_err();
    assert_names(&err, path, &field, offset);
    assert!(err.to_string().contains(why), "{err}");
    let err = image.write_at(&buf, block * 2 * MIB + 512).unwrap_err();
    assert_names(&err, path, &field, offset);
    let err = image.discard(block * 2 * MIB, 4096).unwrap_err();
    assert_names(&err, path, &field, offset);
    let report = image.top().check().unwrap();
    assert!(
        report
            .corruptions
            .iter()
            .any(|f| f.field == field && f.offset == offset && f.message.contains(why)),
        "{:?}",
        report.corruptions
    );
    if block != 0 {
        image.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[512..1024], [0xab; 512], "sound blocks still read");
    }
}

/// Rewrite the dynamic header's field at `at` (relative to the header) and its checksum.
fn patch_header(path: &Path, at: usize, bytes: &[u8]) {
    let mut header = std::fs::read(path).unwrap()[512..1536].to_vec();
    header[at..at + bytes.len()].copy_from_slice(bytes);
    header[36..40].fill(0);
    let sum = vhd_checksum(&header, 36);
    header[36..40].copy_from_slice(&sum.to_be_bytes());
    poke(path, 512, &header);
}

fn set_bat_entry(path: &Path, index: u64, value: u32) {
    poke(path, 1536 + 4 * index, &value.to_be_bytes());
}

#[test]
fn truncated_files() {
    let dir = tempfile::tempdir().unwrap();
    // Cut inside the blocks: the footer copy at 0 is used, then a BAT entry points past
    // the end.
    let path = sample(dir.path(), "cut.vhd");
    let parsed = ParsedVhd::parse(&path);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - MIB)
        .unwrap();
    let first_past = (0..parsed.bat.len())
        .find(|&i| {
            parsed.bat[i] != vhd_fixtures::UNUSED
                && parsed.bat[i] as u64 * 512 + 512 + 2 * MIB > len - MIB
        })
        .unwrap();
    assert_damaged_block(&path, first_past as u64, "past the end");

    let tiny = dir.path().join("tiny.vhd");
    std::fs::write(&tiny, b"conectix").unwrap();
    assert_names(&open_err(&tiny), &tiny, "footer", 0);

    let fixed = dir.path().join("fixed.vhd");
    create_vhd(&fixed, MIB, &[("subformat", "fixed")], None);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&fixed)
        .unwrap()
        .set_len(600_000)
        .unwrap();
    assert_names(&open_err(&fixed), &fixed, "footer cookie", 600_000 - 512);
}

#[test]
fn bad_cookies() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path(), "cookie.vhd");
    let len = std::fs::metadata(&path).unwrap().len();
    poke(&path, len - 512, b"conectiX");
    poke(&path, 0, b"conectiX");
    assert_names(&open_err(&path), &path, "footer cookie", len - 512);

    let path = sample(dir.path(), "header.vhd");
    poke(&path, 512, b"cxsparsE");
    assert_names(&open_err(&path), &path, "header cookie", 512);

    let path = sample(dir.path(), "batmap.vhd");
    let batmap_header = ParsedVhd::parse(&path).batmap.unwrap().header_offset;
    poke(&path, batmap_header, b"qemu was here");
    assert_names(&open_err(&path), &path, "batmap cookie", batmap_header);
}

#[test]
fn bad_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path(), "footer.vhd");
    let len = std::fs::metadata(&path).unwrap().len();
    poke(&path, len - 512 + 100, &[0x42]);
    let err = open_err(&path);
    assert_names(&err, &path, "footer checksum", len - 512 + 64);
    assert!(err.to_string().contains("computed"), "{err}");

    let path = sample(dir.path(), "header.vhd");
    poke(&path, 512 + 800, &[0x42]);
    assert_names(&open_err(&path), &path, "header checksum", 512 + 36);

    let path = sample(dir.path(), "batmap.vhd");
    let batmap = ParsedVhd::parse(&path).batmap.unwrap();
    poke(&path, batmap.offset + 100, &[0x42]);
    assert_names(
        &open_err(&path),
        &path,
        "batmap checksum",
        batmap.header_offset + 24,
    );
}

#[test]
fn bat_entries_out_of_range_into_metadata_or_overlapping() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path(), "past.vhd");
    set_bat_entry(&path, 1, 0x0010_0000);
    assert_damaged_block(&path, 1, "past the end");

    for (sector, what) in [(1u32, "dynamic header"), (3, "BAT"), (0, "footer copy")] {
        let path = sample(dir.path(), &format!("meta{sector}.vhd"));
        set_bat_entry(&path, 0, sector);
        assert_damaged_block(&path, 0, what);
    }
    // Into the batmap that sits after the BAT.
    let path = sample(dir.path(), "batmap.vhd");
    let batmap = ParsedVhd::parse(&path).batmap.unwrap();
    set_bat_entry(&path, 1, (batmap.offset / 512) as u32);
    assert_damaged_block(&path, 1, "batmap");

    // Two entries sharing space: neither is trusted.
    let path = sample(dir.path(), "overlap.vhd");
    let parsed = ParsedVhd::parse(&path);
    set_bat_entry(&path, 1, parsed.bat[2] + 8);
    assert_damaged_block(&path, 1, "overlaps block 2");
    assert_damaged_block(&path, 2, "overlaps block 1");

    // `img check` reports them as corruptions: qemu-img check's exit code 2.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotap"))
        .args(["img", "check"])
        .arg(&path)
        .output()
        .unwrap();
    let text = common::output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("BAT entry 1") && text.contains("BAT entry 2"),
        "{text}"
    );
}

#[test]
fn absurd_table_and_block_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample(dir.path(), "entries.vhd");
    patch_header(&path, 28, &0x7fff_ffffu32.to_be_bytes());
    assert_names(&open_err(&path), &path, "max table entries", 512 + 28);

    let path = sample(dir.path(), "few.vhd");
    patch_header(&path, 28, &1u32.to_be_bytes());
    assert_names(&open_err(&path), &path, "max table entries", 512 + 28);

    for (name, size) in [
        ("odd.vhd", 3 * MIB as u32),
        ("huge.vhd", 1 << 30),
        ("zero.vhd", 0),
    ] {
        let path = sample(dir.path(), name);
        patch_header(&path, 32, &size.to_be_bytes());
        assert_names(&open_err(&path), &path, "block size", 512 + 32);
    }

    let path = sample(dir.path(), "table.vhd");
    patch_header(&path, 16, &(1u64 << 40).to_be_bytes());
    assert_names(&open_err(&path), &path, "table offset", 512 + 16);
}

fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.vhd");
    let child = dir.join("child.vhd");
    create_vhd(&base, 4 * MIB, &[], None);
    create_vhd(&child, 0, &[], Some(&base));
    (base, child)
}

#[test]
fn missing_and_mismatched_parents() {
    let dir = tempfile::tempdir().unwrap();
    let (base, child) = chain(dir.path());
    std::fs::remove_file(&base).unwrap();
    let err = open_err_any(&child);
    assert_eq!(err.path(), Some(child.as_path()), "{err}");
    assert_eq!(err.field(), Some("parent locators"), "{err}");
    // The dynamic header follows the footer copy at 512; its locator table is at +576.
    assert_eq!(err.offset(), Some(512 + 576), "{err}");
    assert!(err.to_string().contains("base.vhd"), "{err}");

    // A different disk under the parent's name: its unique id does not match.
    create_vhd(&base, 4 * MIB, &[], None);
    let err = open_err(&child);
    assert_names(&err, &child, "parent unique id", 512 + 40);
    assert!(err.to_string().contains("base.vhd"), "{err}");

    // The right parent, but the child records another parent time stamp.
    let dir2 = tempfile::tempdir().unwrap();
    let (_, child2) = chain(dir2.path());
    patch_header(&child2, 56, &7u32.to_be_bytes());
    let err = open_err(&child2);
    assert_names(&err, &child2, "parent time stamp", 512 + 56);

    // A raw file in a VHD parent's place: the child records a VHD parent (a parent id),
    // so the parent is opened as a VHD and has no footer.
    std::fs::remove_file(&base).unwrap();
    std::fs::write(&base, vec![0u8; 4 * MIB as usize]).unwrap();
    assert_names(&open_err(&child), &base, "footer cookie", 4 * MIB - 512);
}

fn vhd_options() -> ImageOptions {
    ImageOptions {
        format: Some(Format::Vhd),
        ..ImageOptions::default()
    }
}

fn open_err_any(path: &Path) -> Error {
    match Image::open(path, vhd_options()) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

#[test]
fn cyclic_chains() {
    let dir = tempfile::tempdir().unwrap();
    // A disk that names itself as its parent: locator and parent id both point to itself.
    let (base, child) = chain(dir.path());
    let own_uuid = ParsedVhd::parse(&child).uuid;
    patch_header(&child, 40, &own_uuid);
    std::fs::rename(&child, &base).unwrap();
    assert_names(&open_err(&base), &base, "parent unique id", 512 + 40);

    // A -> B -> A: each names the other (ids matching), so only the chain sees the loop.
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.vhd");
    let b = dir.path().join("b.vhd");
    create_vhd(&a, 4 * MIB, &[], None);
    create_vhd(&b, 0, &[], Some(&a));
    let c = dir.path().join("c.vhd");
    create_vhd(&c, 0, &[], Some(&b));
    let c_uuid = ParsedVhd::parse(&c).uuid;
    std::fs::rename(&c, &a).unwrap();
    patch_header(&b, 40, &c_uuid);
    let err = open_err_any(&a);
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    // b's parent locators close the loop: the error names b, that field and its offset.
    assert_eq!(err.path(), Some(b.as_path()), "{err}");
    assert_eq!(err.field(), Some("parent locators"), "{err}");
    assert_eq!(err.offset(), Some(512 + 576), "{err}");
    assert!(err.to_string().contains("loops back"), "{err}");
}

/// Flip every byte of the metadata (footer copy, header, BAT, batmap, first bitmap) and of
/// the footer, one at a time, to a few values: open, read, write, discard and check must
/// return (an error or a result) without panicking.
#[test]
fn single_byte_corruptions_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    // A small disk (64 KiB blocks) with blocks 0, 2 and 5 allocated.
    let sample_path = dir.path().join("pristine.vhd");
    create_vhd(&sample_path, 512 * 1024, &[("block_size", "65536")], None);
    let image = Image::open(&sample_path, ImageOptions::default()).unwrap();
    for block in [0u64, 2, 5] {
        image.write_at(&[0xab; 4096], block * 65536 + 512).unwrap();
    }
    drop(image);
    let first_bitmap = ParsedVhd::parse(&sample_path).bat[0] as usize * 512;
    let pristine = std::fs::read(&sample_path).unwrap();
    let path = dir.path().join("mutant.vhd");
    let len = pristine.len();
    // Every byte of the fields; a stride through reserved space, padding and bitmaps.
    let positions: Vec<usize> = (0..96)
        .chain(512..512 + 64)
        .chain((512 + 64..1536).step_by(11))
        .chain(1536..1536 + 32)
        .chain((1536 + 32..2048).step_by(29))
        .chain(2048..2048 + 32)
        .chain((2048 + 32..3072).step_by(13))
        .chain((first_bitmap..first_bitmap + 512).step_by(7))
        .chain(len - 512..len - 512 + 96)
        .chain((len - 512 + 96..len).step_by(17))
        .collect();
    std::fs::write(&path, &pristine).unwrap();
    let mut dirty = false;
    let mut opened = 0;
    for &pos in &positions {
        for value in [0xffu8, pristine[pos] ^ 0x01] {
            if value == pristine[pos] {
                continue;
            }
            if dirty {
                std::fs::write(&path, &pristine).unwrap();
            }
            poke(&path, pos as u64, &[value]);
            let Ok(image) = Image::open(&path, vhd_options()) else {
                poke(&path, pos as u64, &[pristine[pos]]);
                dirty = false;
                continue;
            };
            // The operations below may change the file: start the next one afresh.
            dirty = true;
            opened += 1;
            let size = image.virtual_size();
            let mut buf = vec![0u8; 65536.min(size) as usize];
            let _ = image.read_at(&mut buf, 0);
            let _ = image.read_at(&mut buf, size / 2 - size.min(65536) / 2);
            let _ = image.write_at(&[1u8; 1000], 600.min(size.saturating_sub(1000)));
            let _ = image.discard(size / 2, 4096.min(size / 2));
            let _ = image.top().check();
        }
    }
    eprintln!("{opened} of {} mutants opened", positions.len() * 2);
    assert!(
        opened > 0,
        "some corruptions (reserved bytes) leave an openable image"
    );
}
