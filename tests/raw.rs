//! Raw images: O_DIRECT with unaligned requests, holes, block status against qemu-img map.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use ferrotap::image::file::AlignedBuf;
use ferrotap::image::{self, CreateOptions, Format, Image, ImageOptions};

fn create_raw(path: &Path, size: u64) {
    image::create(
        path,
        Format::Raw,
        CreateOptions {
            size,
            backing: None,
            options: BTreeMap::new(),
        },
    )
    .unwrap();
}

/// A directory on a filesystem that supports O_DIRECT (tmpfs may not).
fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

#[test]
fn direct_io_serves_unaligned_requests() {
    let dir = disk_dir();
    let path = dir.path().join("disk.raw");
    create_raw(&path, 1 << 20);
    let image = Image::open(
        &path,
        ImageOptions {
            direct: true,
            ..ImageOptions::default()
        },
    )
    .unwrap();
    let mut model = vec![0u8; 1 << 20];
    for (i, (offset, len)) in [
        (0u64, 4096usize),
        (513, 1000),
        (4095, 2),
        (65_536 + 7, 70_001),
    ]
    .into_iter()
    .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8 | 1).collect();
        image.write_at(&data, offset).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&data);
    }
    // Sector-aligned I/O from aligned memory: direct where the file system reports
    // 512-byte O_DIRECT alignment, bounced where it needs 4 KiB.
    let file = image.top().file();
    let align = file.direct_align();
    assert!(
        align.is_power_of_two() && (512..=4096).contains(&align),
        "{align}"
    );
    let mut sectors = AlignedBuf::zeroed(1536);
    sectors.as_mut_slice().fill(0x6b);
    let at = 17 * 512;
    assert_eq!(
        file.needs_bounce(sectors.as_slice().as_ptr(), 1536, at),
        align != 512
    );
    image.write_at(sectors.as_slice(), at).unwrap();
    model[at as usize..at as usize + 1536].fill(0x6b);
    let mut back = AlignedBuf::zeroed(1536);
    image.read_at(back.as_mut_slice(), at).unwrap();
    assert!(back.as_slice() == sectors.as_slice());
    image.flush().unwrap();
    let mut whole = vec![0u8; 1 << 20];
    image.read_at(&mut whole, 0).unwrap();
    assert!(whole == model);
    let mut piece = vec![0u8; 3];
    image.read_at(&mut piece, 4094).unwrap();
    assert_eq!(piece, model[4094..4097]);
    // The file itself, read without ferrotap, holds the same bytes and keeps its size.
    assert_eq!(std::fs::read(&path).unwrap(), model);
}

#[derive(serde::Deserialize)]
struct QemuMapEntry {
    start: u64,
    length: u64,
    data: bool,
}

#[test]
fn block_status_finds_the_holes_qemu_finds() {
    let dir = disk_dir();
    let path = dir.path().join("sparse.raw");
    create_raw(&path, 8 << 20);
    let image = Image::open(&path, ImageOptions::default()).unwrap();
    image.write_at(&[0x11; 65536], 1 << 20).unwrap();
    image.write_at(&[0x22; 4096], 5 << 20).unwrap();
    image.write_at(&[0x33; 65536], 6 << 20).unwrap();
    image.discard(6 << 20, 65536).unwrap();
    image.flush().unwrap();

    let output = Command::new("qemu-img")
        .args(["map", "--output", "json", "-f", "raw"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success());
    let qemu: Vec<QemuMapEntry> = serde_json::from_slice(&output.stdout).unwrap();
    // Compare data/hole per 4 KiB page, since both sides may merge runs differently.
    let page = 4096u64;
    for entry in &qemu {
        let mut offset = entry.start;
        while offset < entry.start + entry.length {
            let status = image.block_status(offset, page).unwrap();
            assert_eq!(
                !status.zero, entry.data,
                "page at {offset}: ferrotap zero={} but qemu data={}",
                status.zero, entry.data
            );
            offset += page;
        }
    }
    let mut buf = vec![0xffu8; 65536];
    image.read_at(&mut buf, 6 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "discarded range reads zeros");
}

#[test]
fn resize_grows_and_shrinks_the_file() {
    let dir = disk_dir();
    let path = dir.path().join("r.raw");
    create_raw(&path, 1 << 20);
    let image = Image::open(&path, ImageOptions::default()).unwrap();
    image.top().resize(3 << 20).unwrap();
    assert_eq!(image.virtual_size(), 3 << 20);
    image.write_at(&[9; 512], (3 << 20) - 512).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 << 20);
    image.top().resize(1 << 20).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
    let err = image
        .write_at(&[9; 512], (3 << 20) - 512)
        .map(drop)
        .expect_err("past the end");
    assert!(err.to_string().contains("past the end"), "{err}");
}

#[test]
fn raw_refuses_a_backing_file_and_unknown_options() {
    let dir = disk_dir();
    let mut options = BTreeMap::new();
    options.insert("cluster_size".to_string(), "65536".to_string());
    let err = image::create(
        &dir.path().join("x.raw"),
        Format::Raw,
        CreateOptions {
            size: 4096,
            backing: None,
            options,
        },
    )
    .map(drop)
    .expect_err("unknown option");
    assert!(err.to_string().contains("cluster_size"), "{err}");
}
