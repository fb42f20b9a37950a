//! `ferrotap demo`: a self-contained tour of the image layer, run by the README's first
//! command. In a temporary directory it builds a raw base with a pattern, a qcow2 overlay
//! on it and a VHD differencing chain holding the same guest writes, then converts,
//! compares (with ferrotap, and with qemu-img when installed), checks and commits, printing
//! sizes and throughput. Finally it runs a whole simulated Xen host (xensim): xenstored,
//! blkback-shim, the toolstack's vbd3 nodes for a new qcow2 overlay on that chain, the
//! `ferrotap serve` the shim starts, and a simulated guest whose blkfront runs the XenBus
//! handshake, a verified random workload and, after a reconnect, a short random-read run.

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
use crate::toolstack::{self, Vbd3};
use crate::xenstore::Client;

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
    simulated_host(&guest)?;
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

/// Run the simulated blkfront of guest `domid` through the XenBus handshake with `args`; its
/// JSON report.
fn blkfront(exe: &Path, sim: &Path, domid: u32, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(exe)
        .args(["xensim", "blkfront", "--json", "--xenstore", "--dir"])
        .arg(sim)
        .arg("--domid")
        .arg(domid.to_string())
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

/// Start `program args`, its stderr into `log`, and wait until `socket` accepts connections.
fn start_daemon(
    program: &Path,
    args: &[&std::ffi::OsStr],
    log: &Path,
    socket: &Path,
) -> Result<Child> {
    let log_file = std::fs::File::create(log).map_err(|e| Error::io("create", e).with_path(log))?;
    let child = Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| Error::io("start", e).with_path(program))?;
    let mut child = Child(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        if Instant::now() > deadline || matches!(child.0.try_wait(), Ok(Some(_))) {
            return Err(Error::invalid(format!(
                "{} did not start: {}",
                program.display(),
                std::fs::read_to_string(log).unwrap_or_default().trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// Wait until `path` in xenstore reads `want` (or, with `want` None, is gone).
fn wait_for_node(xs: &Client, path: &str, want: Option<&str>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let value = xs.read_opt(0, path)?;
        if value.as_deref() == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::invalid(format!(
                "{path} is {value:?} after 20 s, not {want:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A whole simulated Xen host serving `image` to a guest: xensim's xenstored,
/// blkback-shim watching it, the toolstack's vbd3 nodes, the `ferrotap serve` the shim
/// starts, and a simulated guest whose blkfront runs the XenBus handshake and verified I/O.
fn simulated_host(image: &Path) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("find ferrotap", e))?;
    let shim = exe.with_file_name("ferrotap-shim");
    if !shim.exists() {
        return Err(Error::invalid(format!(
            "{} is missing: build the whole workspace (cargo build --release --workspace)",
            shim.display()
        )));
    }
    // Short, because its sockets must fit in sun_path.
    let sim = SimDir(PathBuf::from(format!(
        "/dev/shm/ftdemo.{}",
        std::process::id()
    )));
    let run_dir = sim.0.join("run");
    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io("create", e).with_path(&run_dir))?;
    let socket = sim.0.join("xenstored");
    let _xenstored = start_daemon(
        &exe,
        &["xensim".as_ref(), "xenstored".as_ref(), sim.0.as_os_str()],
        &sim.0.join("xenstored.log"),
        &socket,
    )?;
    let xs = Client::connect(&socket)?;
    let shim_log = sim.0.join("shim.log");
    let mut shim_child = start_daemon(
        &shim,
        &[
            "--xensim".as_ref(),
            sim.0.as_os_str(),
            "--run-dir".as_ref(),
            run_dir.as_os_str(),
            "--ferrotap".as_ref(),
            exe.as_os_str(),
        ],
        &shim_log,
        &socket,
    )?;
    println!(
        "9. a simulated Xen host ({}): xenstored, blkback-shim (pid {}) watching backend/vbd3",
        sim.0.display(),
        shim_child.0.id()
    );
    let vbd = Vbd3 {
        domid: 1,
        devid: 51712,
        params: image.display().to_string(),
        read_only: false,
        cdrom: false,
    };
    toolstack::attach(&xs, &vbd)?;
    let be = vbd.backend_path();
    wait_for_node(&xs, &format!("{be}/state"), Some("2"))?;
    let feature = |key: &str| -> Result<String> {
        Ok(xs
            .read_opt(0, &format!("{be}/{key}"))?
            .unwrap_or_else(|| "-".into()))
    };
    println!(
        "   toolstack wrote {be}; the shim started ferrotap serve on guest.qcow2 and offered (state 2, InitWait):"
    );
    println!(
        "   max-ring-page-order {}, multi-queue-max-queues {}, feature-max-indirect-segments {}, feature-persistent {}, feature-discard {}, feature-flush-cache {}",
        feature("max-ring-page-order")?,
        feature("multi-queue-max-queues")?,
        feature("feature-max-indirect-segments")?,
        feature("feature-persistent")?,
        feature("feature-discard")?,
        feature("feature-flush-cache")?,
    );
    let verify = blkfront(
        &exe,
        &sim.0,
        vbd.domid,
        &[
            "--workload",
            "verify",
            "--ops",
            "4000",
            "--queues",
            "2",
            "--ring-page-order",
            "2",
            "--persistent",
        ],
    )?;
    println!(
        "   guest 1 connected (2 queues, 4-page rings, persistent grants) and ran a verified workload: {} requests ({} reads, {} writes, {} flushes, {} discards), {} MiB checked, {} errors; sectors {}",
        verify["ops"],
        verify["reads"],
        verify["writes"],
        verify["flushes"],
        verify["discards"],
        verify["verified_bytes"].as_u64().unwrap_or(0) >> 20,
        verify["errors"],
        feature("sectors")?,
    );
    let random = blkfront(
        &exe,
        &sim.0,
        vbd.domid,
        &[
            "--workload",
            "randread",
            "--iodepth",
            "32",
            "--seconds",
            "2",
            "--queues",
            "2",
            "--ring-page-order",
            "2",
            "--persistent",
        ],
    )?;
    println!(
        "   the guest reconnected for 4 KiB random reads at queue depth 32: {:.0} IOPS, p50 {:.0} us, p99 {:.0} us",
        random["iops"].as_f64().unwrap_or(0.0),
        random["p50_us"].as_f64().unwrap_or(0.0),
        random["p99_us"].as_f64().unwrap_or(0.0)
    );
    let closed = toolstack::detach(&xs, vbd.domid, vbd.devid, Duration::from_secs(20))?;
    wait_for_serve_exit(&run_dir)?;
    println!(
        "   toolstack detached the disk ({}); the shim stopped its serve; nodes removed",
        if closed {
            "backend Closed"
        } else {
            "backend did not close in time"
        }
    );
    let _ = shim_child.0.kill();
    let _ = shim_child.0.wait();
    Ok(())
}

/// Wait (bounded) until no serve control socket is left in the shim's run directory.
fn wait_for_serve_exit(run_dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = std::fs::read_dir(run_dir)
            .map_err(|e| Error::io("list", e).with_path(run_dir))?
            .filter_map(|entry| entry.ok())
            .any(|entry| entry.file_name().to_string_lossy().ends_with(".sock"));
        if !left {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::invalid(
                "the shim left its serve running after detach",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
