//! Helpers shared by the integration tests.

// Each integration test is its own crate and uses only some of these.
#![allow(dead_code)]

pub mod blkif;
pub mod host;
pub mod toolstack;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use ferrotap::image::{self, CreateBacking, CreateOptions, Format, Image, ImageOptions};

/// Run a command and assert it succeeded, showing its output when it did not; a missing
/// program (an oracle not installed) fails the test.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is the oracle installed?)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        output_text(&out)
    );
    out
}

/// A finished command's stdout and then its stderr, as text (for messages and searches).
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Open an image chain read-write.
pub fn open_rw(path: &Path) -> Image {
    Image::open(path, ImageOptions::default()).unwrap()
}

/// Open an image chain read-only.
pub fn open_ro(path: &Path) -> Image {
    let options = ImageOptions {
        read_only: true,
        ..ImageOptions::default()
    };
    Image::open(path, options).unwrap()
}

/// The whole virtual disk of `image`.
pub fn read_all(image: &Image) -> Vec<u8> {
    let mut data = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut data, 0).unwrap();
    data
}

/// Create a VHD of `size` with `-o` options, on `parent` when given (recorded by the path
/// as given).
pub fn create_vhd(path: &Path, size: u64, opts: &[(&str, &str)], parent: Option<&Path>) {
    // Probed, but recorded as VHD whatever it is.
    let backing = parent.map(|p| CreateBacking {
        format: Format::Vhd,
        ..CreateBacking::open(&p.to_string_lossy(), p, None).unwrap()
    });
    let options = CreateOptions::new(size)
        .with_options(opts)
        .with_backing(backing);
    image::create(path, Format::Vhd, options).unwrap();
}

/// target/<profile>/ferrotap-shim, built once per test run so it is never stale.
pub fn shim_binary() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let ferrotap = PathBuf::from(env!("CARGO_BIN_EXE_ferrotap"));
        let profile_dir = ferrotap.parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "-p",
                "blkback-shim",
                "--bin",
                "ferrotap-shim",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        run_ok(&mut build);
        let shim = profile_dir.join("ferrotap-shim");
        assert!(shim.is_file(), "{} was not built", shim.display());
        shim
    })
}
