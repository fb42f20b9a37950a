//! `ferrotap demo`: a self-contained tour of the image layer, run by the README's first
//! command. In a temporary directory it builds a raw base with a pattern, a qcow2 overlay
//! on it and a VHD differencing chain holding the same guest writes, then converts,
//! compares (with ferrotap, and with qemu-img when installed), checks and commits, printing
//! sizes and throughput. Finally it serves a new qcow2 overlay on that chain as a guest disk on a simulated
//! Xen host (xensim): `ferrotap serve` and a simulated blkfront, each its own process, run
//! a verified random workload and a short random-read run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args;

use crate::error::{Error, Result};
use crate::image::{Format, Image};
use crate::img::check::check_layer;
use crate::img::commit::commit;
use crate::img::compare::{compare_files, Comparison};
use crate::img::convert::convert;
use crate::img::create::create_image;
use crate::img::open_image;
use crate::img::progress::Progress;
use crate::img::size::human_size;

const MIB: u64 = 1 << 20;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Virtual disk size in MiB.
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
    /// Work in this directory (created; kept afterwards) instead of a temporary one.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Removes the demo's temporary directory, whatever happened.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest writes applied both to the qcow2 overlay and to the VHD child: unaligned,
/// crossing cluster and block boundaries, one past the base's written part.
fn guest_writes(size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 4096),
        (65_536 - 700, 3000),
        (MIB + 12_345, 200_000),
        (2 * MIB - 512, 1024),
        (size / 2 + 4096, 3 * MIB + 17),
        (size - 8192, 8192),
    ]
}

/// Deterministic, mostly non-zero bytes for `[offset, offset+len)` of pattern `seed`.
fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let at = offset + i as u64;
        let mut x = (at / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed;
        x ^= x >> 29;
        *byte = (x >> (8 * (at % 8))) as u8 | 1;
    }
}

fn rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-6);
    format!(
        "{} in {:.3} s ({:.0} MiB/s)",
        human_size(bytes),
        secs,
        bytes as f64 / MIB as f64 / secs
    )
}

fn describe(path: &Path) -> Result<String> {
    let image = open_image(path, None, true)?;
    let top = image.top();
    let mut text = format!(
        "{:<14} {:<5} virtual {:>9}, on disk {:>9}",
        file_name(path),
        top.format().name(),
        human_size(top.virtual_size()),
        human_size(top.file().allocated_bytes()?)
    );
    if image.layers().len() > 1 {
        let parents: Vec<String> = image.layers()[1..]
            .iter()
            .map(|l| file_name(l.file().path()))
            .collect();
        text.push_str(&format!(", backed by {}", parents.join(" <- ")));
    }
    Ok(text)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn expect_identical(a: &Path, b: &Path) -> Result<()> {
    match compare_files(a, None, b, None, false)? {
        Comparison::Identical { .. } => {
            println!(
                "  ferrotap compare {} {}: identical",
                file_name(a),
                file_name(b)
            );
            Ok(())
        }
        other => Err(Error::invalid(format!(
            "demo: {} and {} differ: {other:?}",
            a.display(),
            b.display()
        ))),
    }
}

/// `qemu-img compare` as an independent oracle; `Ok(false)` when qemu-img is not installed.
fn qemu_compare(a: &Path, b: &Path) -> Result<bool> {
    let output = match Command::new("qemu-img")
        .arg("compare")
        .arg(a)
        .arg(b)
        .output()
    {
        Ok(output) => output,
        Err(_) => return Ok(false),
    };
    if !output.status.success() {
        return Err(Error::invalid(format!(
            "demo: qemu-img compare {} {} says: {}{}",
            a.display(),
            b.display(),
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    println!(
        "  qemu-img compare {} {}: identical",
        file_name(a),
        file_name(b)
    );
    Ok(true)
}

fn apply_writes(path: &Path, size: u64, discard: (u64, u64)) -> Result<u64> {
    let image = open_image(path, None, false)?;
    let mut written = 0;
    for (offset, len) in guest_writes(size) {
        let mut buf = vec![0u8; len as usize];
        pattern(2, offset, &mut buf);
        image.write_at(&buf, offset)?;
        written += len;
    }
    image.discard(discard.0, discard.1)?;
    image.flush()?;
    Ok(written)
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let size = args.size_mib.max(8) * MIB;
    let (dir, _cleanup) = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("mkdir", e).with_path(dir))?;
            (dir.clone(), None)
        }
        None => {
            let dir = std::env::temp_dir().join(format!("ferrotap-demo-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| Error::io("mkdir", e).with_path(&dir))?;
            (dir.clone(), Some(TempDir(dir)))
        }
    };
    let at = |name: &str| dir.join(name);
    let no_options = Default::default;
    println!("ferrotap demo in {}", dir.display());

    // 1. A raw base: the first three quarters written with a pattern, the rest a hole.
    let base_raw = at("base.raw");
    create_image(&base_raw, Format::Raw, Some(size), None, no_options())?;
    let written_part = size / 4 * 3;
    let mut write_time = Duration::ZERO;
    {
        let base = open_image(&base_raw, Some(Format::Raw), false)?;
        let mut buf = vec![0u8; MIB as usize];
        let mut pos = 0;
        while pos < written_part {
            pattern(1, pos, &mut buf);
            let started = Instant::now();
            base.write_at(&buf, pos)?;
            write_time += started.elapsed();
            pos += MIB;
        }
        let started = Instant::now();
        base.flush()?;
        write_time += started.elapsed();
    }
    println!("1. raw base written: {}", rate(written_part, write_time));

    // 2. A qcow2 overlay on it, with guest writes and a discard through ferrotap.
    let overlay = at("overlay.qcow2");
    create_image(
        &overlay,
        Format::Qcow2,
        None,
        Some(("base.raw", Some(Format::Raw))),
        no_options(),
    )?;
    let discard = (4 * MIB, MIB);
    let n = apply_writes(&overlay, size, discard)?;
    println!(
        "2. qcow2 overlay on base.raw: {} guest writes ({}) and a 1 MiB discard",
        guest_writes(size).len(),
        human_size(n)
    );

    // 3. The same base as a dynamic VHD, and a differencing VHD with the same writes.
    let base_vhd = at("base.vhd");
    let started = Instant::now();
    convert(
        &base_raw,
        None,
        &base_vhd,
        Format::Vhd,
        no_options(),
        |_| Progress::hidden(),
    )?;
    println!(
        "3. convert base.raw -> base.vhd: {}",
        rate(size, started.elapsed())
    );
    let child = at("child.vhd");
    create_image(
        &child,
        Format::Vhd,
        None,
        Some(("base.vhd", Some(Format::Vhd))),
        no_options(),
    )?;
    apply_writes(&child, size, discard)?;
    println!("   differencing child.vhd on base.vhd: the same writes and discard");

    // 4. Both chains show the guest the same disk.
    println!("4. compare the two chains");
    expect_identical(&overlay, &child)?;

    // 5. Flatten each chain into the other format, and check the results against both.
    let flat_qcow2 = at("flat.qcow2");
    let flat_vhd = at("flat.vhd");
    let started = Instant::now();
    convert(
        &child,
        None,
        &flat_qcow2,
        Format::Qcow2,
        no_options(),
        |_| Progress::hidden(),
    )?;
    println!(
        "5. convert child.vhd chain -> flat.qcow2: {}",
        rate(size, started.elapsed())
    );
    convert(&overlay, None, &flat_vhd, Format::Vhd, no_options(), |_| {
        Progress::hidden()
    })?;
    println!("   convert overlay.qcow2 chain -> flat.vhd");
    expect_identical(&flat_qcow2, &overlay)?;
    expect_identical(&flat_vhd, &child)?;
    let qemu = qemu_compare(&overlay, &flat_qcow2)?;
    if !qemu {
        println!("  (qemu-img not installed: skipped its independent compare)");
    }

    // 6. Every image's metadata checks clean.
    println!("6. check");
    let images = [
        &base_raw,
        &overlay,
        &base_vhd,
        &child,
        &flat_qcow2,
        &flat_vhd,
    ];
    for path in images {
        let (format, report) = check_layer(path, None)?;
        if !report.corruptions.is_empty() || !report.leaks.is_empty() {
            return Err(Error::invalid(format!(
                "demo: {} ({format}) fails its check: {:?}",
                path.display(),
                report
            )));
        }
        println!("  {} ({format}): no errors", file_name(path));
    }

    // 7. Commit (coalesce) the VHD child into its parent: the parent now equals the chain.
    let started = Instant::now();
    let stats = commit(&child, None, |_| Progress::hidden())?;
    println!(
        "7. commit child.vhd into base.vhd: {} copied, {} zeroed, in {:.3} s",
        human_size(stats.copied),
        human_size(stats.zeroed),
        started.elapsed().as_secs_f64()
    );
    expect_identical(&base_vhd, &flat_qcow2)?;
    if qemu {
        qemu_compare(&flat_qcow2, &flat_vhd)?;
    }

    // 8. Sequential read of a whole chain through the image layer.
    let image: Image = open_image(&overlay, None, true)?;
    let mut buf = vec![0u8; MIB as usize];
    let started = Instant::now();
    let mut pos = 0;
    while pos < size {
        let len = MIB.min(size - pos) as usize;
        image.read_at(&mut buf[..len], pos)?;
        pos += len as u64;
    }
    println!(
        "8. sequential read of overlay.qcow2 chain: {}",
        rate(size, started.elapsed())
    );

    // 9. A fresh qcow2 overlay on the chain, served to a simulated guest: the images above
    //    stay as they are.
    let guest = at("guest.qcow2");
    create_image(
        &guest,
        Format::Qcow2,
        None,
        Some(("overlay.qcow2", Some(Format::Qcow2))),
        no_options(),
    )?;
    serve_on_xensim(&guest)?;
    let (_, report) = check_layer(&guest, None)?;
    if !report.corruptions.is_empty() || !report.leaks.is_empty() {
        return Err(Error::invalid(format!(
            "guest.qcow2 does not check clean after the guest's I/O: {} corruptions, {} leaks",
            report.corruptions.len(),
            report.leaks.len()
        )));
    }
    println!("   guest.qcow2 checks clean afterwards");

    println!("images:");
    for path in images {
        println!("  {}", describe(path)?);
    }
    match &args.dir {
        Some(dir) => println!("demo done; images kept in {}", dir.display()),
        None => println!("demo done; temporary directory removed"),
    }
    Ok(())
}

/// A simulated host directory: short, because its sockets must fit in sun_path.
struct SimDir(PathBuf);

impl Drop for SimDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills a child process left running when the demo fails.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Run the simulated blkfront with `args`; its JSON report.
fn blkfront(exe: &Path, sim: &Path, control: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(exe)
        .args(["xensim", "blkfront", "--json", "--dir"])
        .arg(sim)
        .arg("--control")
        .arg(control)
        .args(args)
        .output()
        .map_err(|e| Error::io("run the simulated blkfront", e))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "simulated blkfront failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .ok_or_else(|| Error::invalid("simulated blkfront printed no report"))
}

/// `ferrotap serve` on `image`, driven by a simulated blkfront over xensim.
fn serve_on_xensim(image: &Path) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("find ferrotap", e))?;
    let sim = SimDir(PathBuf::from(format!(
        "/dev/shm/ftdemo.{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&sim.0).map_err(|e| Error::io("create", e).with_path(&sim.0))?;
    let control = sim.0.join("vbd.ctl");
    let serve = Command::new(&exe)
        .arg("serve")
        .arg("--image")
        .arg(image)
        .arg("--xensim")
        .arg(&sim.0)
        .arg("--control")
        .arg(&control)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| Error::io("start ferrotap serve", e))?;
    let mut serve = Child(serve);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&control).is_err() {
        if Instant::now() > deadline {
            return Err(Error::invalid("ferrotap serve did not start"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "9. ferrotap serve on guest.qcow2 (a new overlay on the chain; pid {}), a simulated guest on xensim ({})",
        serve.0.id(),
        sim.0.display()
    );
    let verify = blkfront(
        &exe,
        &sim.0,
        &control,
        &[
            "--workload",
            "verify",
            "--ops",
            "4000",
            "--queues",
            "2",
            "--persistent",
        ],
    )?;
    println!(
        "   verified workload, 2 queues, persistent grants: {} requests ({} reads, {} writes, {} flushes, {} discards), {} MiB checked, {} errors",
        verify["ops"],
        verify["reads"],
        verify["writes"],
        verify["flushes"],
        verify["discards"],
        verify["verified_bytes"].as_u64().unwrap_or(0) >> 20,
        verify["errors"]
    );
    let random = blkfront(
        &exe,
        &sim.0,
        &control,
        &[
            "--workload",
            "randread",
            "--iodepth",
            "32",
            "--seconds",
            "2",
            "--persistent",
        ],
    )?;
    println!(
        "   4 KiB random reads at queue depth 32: {:.0} IOPS, p50 {:.0} us, p99 {:.0} us",
        random["iops"].as_f64().unwrap_or(0.0),
        random["p50_us"].as_f64().unwrap_or(0.0),
        random["p99_us"].as_f64().unwrap_or(0.0)
    );
    let mut stream = std::os::unix::net::UnixStream::connect(&control)
        .map_err(|e| Error::io("connect to serve", e))?;
    std::io::Write::write_all(&mut stream, b"{\"op\":\"close\"}\n")
        .map_err(|e| Error::io("close serve", e))?;
    let _ = serve.0.wait();
    Ok(())
}
