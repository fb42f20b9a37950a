//! The I/O engines, each test run on both io_uring and native AIO. The oracle for data is
//! the file read back with std::fs (the page cache the O_DIRECT writes went around), and for
//! timing the wall clock.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ferrotap::engine::{aio::AioEngine, new_engine, uring::UringEngine};
use ferrotap::engine::{Completion, Engine, EngineKind, Op};
use ferrotap::image::file::AlignedBuf;

const KINDS: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Aio];
const BLOCK: usize = 4096;

fn engine(kind: EngineKind, depth: u32) -> Box<dyn Engine> {
    new_engine(kind, depth).unwrap_or_else(|e| panic!("{kind:?} engine: {e}"))
}

/// A temp dir on a disk file system and one on tmpfs.
fn dirs() -> Vec<tempfile::TempDir> {
    vec![
        tempfile::tempdir_in("/var/tmp").unwrap(),
        tempfile::tempdir_in("/dev/shm").unwrap(),
    ]
}

/// Deterministic bytes for block `n` of a test file.
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x2545_f491;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A file of `blocks` blocks of pattern(seed), opened O_DIRECT read-write.
fn direct_file(dir: &Path, blocks: usize, seed: u64) -> (std::path::PathBuf, File) {
    let path = dir.join("disk");
    let mut f = File::create(&path).unwrap();
    for n in 0..blocks {
        f.write_all(&pattern(seed, n)).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap_or_else(|e| panic!("O_DIRECT open of {}: {e}", path.display()));
    (path, f)
}

/// Wait until `n` completions arrived (10 s at most) and return them sorted by token.
fn collect(e: &mut dyn Engine, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let start = Instant::now();
    while out.len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}: completions lost: {} of {n}, in flight {}",
            e.kind(),
            out.len(),
            e.in_flight()
        );
        e.wait(n - out.len(), Some(Duration::from_secs(10)), &mut out)
            .unwrap();
    }
    assert_eq!(out.len(), n, "more completions than operations");
    out.sort_by_key(|c| c.token);
    out
}

fn read_op(fd: RawFd, offset: u64, buf: &mut [u8]) -> Op {
    Op::Read {
        fd,
        offset,
        buf: buf.as_mut_ptr(),
        len: buf.len() as u32,
    }
}

fn write_op(fd: RawFd, offset: u64, buf: &[u8]) -> Op {
    Op::Write {
        fd,
        offset,
        buf: buf.as_ptr(),
        len: buf.len() as u32,
    }
}

/// Push a write of pattern(`seed`) over each of the first `blocks` blocks of `fd`, block
/// `(i * stride) % blocks` i-th (scattered; `stride` coprime with `blocks`), with the
/// block's index as token. The returned buffer holds the data: keep it until every
/// completion is collected.
fn push_scattered_writes(
    e: &mut dyn Engine,
    fd: RawFd,
    blocks: usize,
    seed: u64,
    stride: usize,
) -> AlignedBuf {
    let mut wbuf = AlignedBuf::zeroed(blocks * BLOCK);
    for n in 0..blocks {
        wbuf.as_mut_slice()[n * BLOCK..(n + 1) * BLOCK].copy_from_slice(&pattern(seed, n));
    }
    for i in 0..blocks {
        let n = (i * stride) % blocks;
        let chunk = &wbuf.as_slice()[n * BLOCK..(n + 1) * BLOCK];
        // SAFETY: the buffer's heap block goes back to the caller, who keeps it until the
        // completions are collected (this function's contract).
        unsafe { e.push(n as u64, write_op(fd, (n * BLOCK) as u64, chunk)) }.unwrap();
    }
    wbuf
}

/// O_DIRECT writes then reads on a disk file and a tmpfs file, with more ops than the
/// queue is deep (256 on depth 64) and all of them pushed before the first wait.
#[test]
fn direct_io_many_in_flight() {
    for kind in KINDS {
        for dir in dirs() {
            let blocks = 256;
            let (path, file) = direct_file(dir.path(), blocks, 1);
            let fd = file.as_raw_fd();
            let mut e = engine(kind, 64);

            // Overwrite every block in a scattered order with pattern 2.
            let wbuf = push_scattered_writes(e.as_mut(), fd, blocks, 2, 97);
            assert_eq!(e.in_flight(), blocks, "{kind:?}");
            let done = collect(e.as_mut(), blocks);
            for (n, c) in done.iter().enumerate() {
                assert_eq!(
                    *c,
                    Completion {
                        token: n as u64,
                        result: BLOCK as i32
                    },
                    "{kind:?}"
                );
            }
            assert_eq!(e.in_flight(), 0);
            let on_disk = std::fs::read(&path).unwrap();
            assert!(
                on_disk == wbuf.as_slice(),
                "{kind:?} {}: written data differs",
                path.display()
            );

            // Read it all back, also 256 at once.
            let mut rbuf = AlignedBuf::zeroed(blocks * BLOCK);
            let base = rbuf.as_mut_slice().as_mut_ptr();
            for n in (0..blocks).rev() {
                let op = Op::Read {
                    fd,
                    offset: (n * BLOCK) as u64,
                    buf: base.wrapping_add(n * BLOCK),
                    len: BLOCK as u32,
                };
                // SAFETY: rbuf outlives the wait below that returns every completion.
                unsafe { e.push(1000 + n as u64, op) }.unwrap();
            }
            let done = collect(e.as_mut(), blocks);
            assert!(
                done.iter().all(|c| c.result == BLOCK as i32),
                "{kind:?}: {done:?}"
            );
            assert!(
                rbuf.as_slice() == on_disk.as_slice(),
                "{kind:?}: read data differs"
            );
        }
    }
}

/// fdatasync completes with 0 after writes; a read past the end is short and returned as is.
#[test]
fn fsync_and_short_read() {
    for kind in KINDS {
        for dir in dirs() {
            let (path, file) = direct_file(dir.path(), 3, 3);
            let fd = file.as_raw_fd();
            let mut e = engine(kind, 8);
            let data = {
                let mut b = AlignedBuf::zeroed(BLOCK);
                b.as_mut_slice().copy_from_slice(&pattern(4, 0));
                b
            };
            // SAFETY: data lives until the completion is collected.
            unsafe { e.push(1, write_op(fd, 0, data.as_slice())) }.unwrap();
            assert_eq!(collect(e.as_mut(), 1)[0].result, BLOCK as i32);
            // SAFETY: an fsync carries no buffer.
            unsafe { e.push(2, Op::Fsync { fd }) }.unwrap();
            assert_eq!(
                collect(e.as_mut(), 1),
                vec![Completion {
                    token: 2,
                    result: 0
                }]
            );
            assert_eq!(&std::fs::read(&path).unwrap()[..BLOCK], data.as_slice());

            let mut buf = AlignedBuf::zeroed(2 * BLOCK);
            // SAFETY: buf lives until the completion is collected.
            unsafe { e.push(3, read_op(fd, 2 * BLOCK as u64, buf.as_mut_slice())) }.unwrap();
            assert_eq!(
                collect(e.as_mut(), 1),
                vec![Completion {
                    token: 3,
                    result: BLOCK as i32
                }],
                "{kind:?}: short read at the end of the file"
            );
            assert_eq!(&buf.as_slice()[..BLOCK], pattern(3, 2).as_slice());
        }
    }
}

/// Errors come back as negative errno completions, not as panics or Err from push/wait.
#[test]
fn errors_are_negative_errno() {
    for kind in KINDS {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; BLOCK]).unwrap();
        let write_only = OpenOptions::new().write(true).open(&path).unwrap();
        // Far above any open fd (a just-closed number would be reused by the engine's own).
        let unused_fd = 1 << 20;
        let mut e = engine(kind, 4);
        let mut buf = vec![0u8; BLOCK];
        let ops = [
            read_op(write_only.as_raw_fd(), 0, &mut buf),
            read_op(unused_fd, 0, &mut buf),
            read_op(-1, 0, &mut buf),
            Op::Fsync { fd: -1 },
        ];
        for (token, op) in ops.into_iter().enumerate() {
            // SAFETY: buf lives until the completions are collected.
            unsafe { e.push(token as u64, op) }.unwrap();
        }
        let done = collect(e.as_mut(), 4);
        for c in &done {
            assert_eq!(c.result, -libc::EBADF, "{kind:?}: {done:?}");
        }
        assert_eq!(e.in_flight(), 0);
        // A pipe cannot be synced: AIO refuses IOCB_CMD_FDSYNC with EINVAL, which sends it
        // down the synchronous fdatasync fallback, which fails the same way.
        let (pipe_r, _pipe_w) = pipe();
        // SAFETY: an fsync carries no buffer.
        unsafe {
            e.push(
                9,
                Op::Fsync {
                    fd: pipe_r.as_raw_fd(),
                },
            )
        }
        .unwrap();
        assert_eq!(
            collect(e.as_mut(), 1),
            vec![Completion {
                token: 9,
                result: -libc::EINVAL
            }],
            "{kind:?}"
        );
        assert_eq!(buf, vec![0u8; BLOCK]);
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes plain integers and returns a new fd or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the live array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds nothing else owns.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// A wait that gets nothing returns after about its timeout, and Some(ZERO) never blocks.
fn assert_nothing_for(e: &mut dyn Engine, timeout: Duration) {
    let mut out = Vec::new();
    let start = Instant::now();
    e.wait(1, Some(timeout), &mut out).unwrap();
    let took = start.elapsed();
    assert!(out.is_empty(), "{:?}: unexpected {out:?}", e.kind());
    assert!(
        took >= timeout.mul_f32(0.9),
        "{:?}: returned after {took:?}",
        e.kind()
    );
    assert!(
        took < timeout + Duration::from_millis(200),
        "{:?}: took {took:?}",
        e.kind()
    );
}

/// A watch fires once after its fd becomes readable, not before, and is not counted as an
/// operation in flight.
#[test]
fn watch_readable_is_one_shot() {
    for kind in KINDS {
        let mut e = engine(kind, 4);
        let efd = eventfd();
        let (pipe_r, mut pipe_w) = pipe();
        e.watch_readable(efd.as_raw_fd(), 10).unwrap();
        e.watch_readable(pipe_r.as_raw_fd(), 11).unwrap();
        assert_eq!(e.in_flight(), 0);
        assert_nothing_for(e.as_mut(), Duration::from_millis(60));

        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local to the eventfd.
        let written = unsafe { libc::write(efd.as_raw_fd(), one.as_ptr().cast(), 8) };
        assert_eq!(written, 8);
        let got = collect(e.as_mut(), 1);
        assert_eq!(got[0].token, 10);
        assert!(
            got[0].result & i32::from(libc::POLLIN) != 0,
            "{kind:?}: {got:?}"
        );

        // Still readable, but the watch was one-shot; the pipe is still quiet.
        assert_nothing_for(e.as_mut(), Duration::from_millis(60));

        pipe_w.write_all(b"x").unwrap();
        let got = collect(e.as_mut(), 1);
        assert_eq!(got[0].token, 11, "{kind:?}");
        assert_nothing_for(e.as_mut(), Duration::from_millis(30));

        // Re-armed on an fd that is already readable: fires at once.
        e.watch_readable(efd.as_raw_fd(), 12).unwrap();
        let got = collect(e.as_mut(), 1);
        assert_eq!(got[0].token, 12, "{kind:?}");
        drop(pipe_r);
    }
}

/// Some(ZERO) returns at once even with nothing ready and a busy-poll window set;
/// a plain timeout returns after about the timeout with nothing.
#[test]
fn timeouts() {
    for kind in KINDS {
        let mut e = engine(kind, 4);
        e.set_busy_poll(Duration::from_millis(500));
        let (r, _w) = pipe();
        e.watch_readable(r.as_raw_fd(), 1).unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        for _ in 0..100 {
            e.wait(1, Some(Duration::ZERO), &mut out).unwrap();
        }
        assert!(out.is_empty());
        assert!(
            start.elapsed() < Duration::from_millis(100),
            "{kind:?}: {:?}",
            start.elapsed()
        );
        e.set_busy_poll(Duration::ZERO);
        assert_nothing_for(e.as_mut(), Duration::from_millis(150));
        // min_complete 0 with no limit: submits, does not wait.
        let start = Instant::now();
        e.wait(0, None, &mut out).unwrap();
        assert!(out.is_empty());
        assert!(start.elapsed() < Duration::from_millis(100));
    }
}

/// With a busy-poll window, completions still arrive (found by spinning or after it).
#[test]
fn busy_poll_window() {
    for kind in KINDS {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let (path, file) = direct_file(dir.path(), 16, 5);
        let mut e = engine(kind, 16);
        e.set_busy_poll(Duration::from_millis(2));
        let mut buf = AlignedBuf::zeroed(BLOCK);
        for n in 0..16 {
            // SAFETY: buf lives until the completion is collected.
            unsafe {
                e.push(
                    n,
                    read_op(file.as_raw_fd(), n * BLOCK as u64, buf.as_mut_slice()),
                )
            }
            .unwrap();
            assert_eq!(collect(e.as_mut(), 1)[0].result, BLOCK as i32);
            assert_eq!(
                buf.as_slice(),
                pattern(5, n as usize).as_slice(),
                "{kind:?}"
            );
        }
        drop(path);
    }
}

/// Ops inside registered regions (two regions: index 0 and 1) move the same data as plain
/// ops; an op straddling a region's end falls back to a plain op.
#[test]
fn registered_buffers() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (path, file) = direct_file(dir.path(), 32, 6);
    let fd = file.as_raw_fd();
    let mut uring = UringEngine::new(32).unwrap();
    assert!(!uring.fixed_buffers());
    for kind in KINDS {
        let mut e = engine(kind, 32);
        let mut regions = [AlignedBuf::zeroed(8 * BLOCK), AlignedBuf::zeroed(8 * BLOCK)];
        let [ref mut r0, ref mut r1] = regions;
        e.register_buffers(&[
            (r0.as_mut_slice().as_mut_ptr(), 8 * BLOCK),
            (r1.as_mut_slice().as_mut_ptr(), 8 * BLOCK),
        ])
        .unwrap();
        // Read blocks 0..8 into r0 and 8..16 into r1, 2 blocks per op.
        for i in 0..4 {
            let off = (i * 2 * BLOCK) as u64;
            let (b0, b1) = (
                &mut r0.as_mut_slice()[i * 2 * BLOCK..(i + 1) * 2 * BLOCK],
                &mut r1.as_mut_slice()[i * 2 * BLOCK..(i + 1) * 2 * BLOCK],
            );
            // SAFETY: the regions live until the completions are collected.
            unsafe {
                e.push(i as u64, read_op(fd, off, b0)).unwrap();
                e.push(10 + i as u64, read_op(fd, off + 8 * BLOCK as u64, b1))
                    .unwrap();
            }
        }
        let done = collect(e.as_mut(), 8);
        assert!(
            done.iter().all(|c| c.result == 2 * BLOCK as i32),
            "{kind:?}: {done:?}"
        );
        let disk = std::fs::read(&path).unwrap();
        assert!(r0.as_slice() == &disk[..8 * BLOCK], "{kind:?}");
        assert!(r1.as_slice() == &disk[8 * BLOCK..16 * BLOCK], "{kind:?}");

        // Write r1 then r0 to blocks 16..32 from inside the regions.
        for (i, r) in [&*r1, &*r0].into_iter().enumerate() {
            // SAFETY: the regions live until the completions are collected.
            unsafe {
                e.push(
                    i as u64,
                    write_op(fd, ((16 + 8 * i) * BLOCK) as u64, r.as_slice()),
                )
            }
            .unwrap();
        }
        let done = collect(e.as_mut(), 2);
        assert!(
            done.iter().all(|c| c.result == 8 * BLOCK as i32),
            "{kind:?}: {done:?}"
        );
        let after = std::fs::read(&path).unwrap();
        assert!(after[16 * BLOCK..24 * BLOCK] == disk[8 * BLOCK..16 * BLOCK]);
        assert!(after[24 * BLOCK..32 * BLOCK] == disk[..8 * BLOCK]);
    }
    // The same through the concrete type, which says whether fixed buffers are in use.
    let mut region = AlignedBuf::zeroed(4 * BLOCK);
    let base = region.as_mut_slice().as_mut_ptr();
    uring.register_buffers(&[(base, 4 * BLOCK)]).unwrap();
    assert!(
        uring.fixed_buffers(),
        "fixed buffers refused (RLIMIT_MEMLOCK?)"
    );
    // Straddling the end of the region: a plain op, same data.
    let mut big = AlignedBuf::zeroed(8 * BLOCK);
    let inside = &mut region.as_mut_slice()[BLOCK..3 * BLOCK];
    // SAFETY: region and big live until the completions are collected.
    unsafe {
        uring.push(1, read_op(fd, 0, inside)).unwrap();
        uring.push(2, read_op(fd, 0, big.as_mut_slice())).unwrap();
    }
    let done = collect(&mut uring, 2);
    assert_eq!(done[0].result, 2 * BLOCK as i32);
    assert_eq!(done[1].result, 8 * BLOCK as i32);
    let disk = std::fs::read(&path).unwrap();
    assert!(region.as_slice()[BLOCK..3 * BLOCK] == disk[..2 * BLOCK]);
    assert!(big.as_slice() == &disk[..8 * BLOCK]);
}

/// Dropping an engine with reads in flight waits for them: the data is in the buffer
/// as soon as drop returns.
#[test]
fn drop_waits_for_in_flight() {
    for kind in KINDS {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let blocks = 32;
        let (path, file) = direct_file(dir.path(), blocks, 7);
        let mut buf = AlignedBuf::zeroed(blocks * BLOCK);
        {
            let mut e = engine(kind, 32);
            let base = buf.as_mut_slice().as_mut_ptr();
            for n in 0..blocks {
                let op = Op::Read {
                    fd: file.as_raw_fd(),
                    offset: (n * BLOCK) as u64,
                    buf: base.wrapping_add(n * BLOCK),
                    len: BLOCK as u32,
                };
                // SAFETY: buf outlives the engine, whose drop waits for the reads.
                unsafe { e.push(n as u64, op) }.unwrap();
            }
            // Submit without waiting for anything.
            let mut out = Vec::new();
            e.wait(0, Some(Duration::ZERO), &mut out).unwrap();
        }
        assert!(
            buf.as_slice() == std::fs::read(&path).unwrap().as_slice(),
            "{kind:?}"
        );
    }
}

#[test]
fn engines_are_send() {
    fn assert_send<T: Send>() {}
    assert_send::<UringEngine>();
    assert_send::<AioEngine>();
}

/// Ops on registered files reach the right file (a wrong index would land in the other
/// one), on both engines (AIO ignores the registration); fds not registered still work.
#[test]
fn registered_files() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let file_in = |name: &str, seed| {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        direct_file(&sub, 4, seed)
    };
    let (path_a, file_a) = file_in("a", 21);
    let (path_b, file_b) = file_in("b", 22);
    let (path_c, file_c) = file_in("c", 23);
    let mut uring = UringEngine::new(8).unwrap();
    uring
        .register_files(&[file_a.as_raw_fd(), file_b.as_raw_fd()])
        .unwrap();
    assert!(uring.registered_files());
    for kind in KINDS {
        let mut e = engine(kind, 8);
        e.register_files(&[file_a.as_raw_fd(), file_b.as_raw_fd()])
            .unwrap();
        let data: Vec<u8> = (0..3).flat_map(|n| pattern(99 + kind as u64, n)).collect();
        let mut bufs = [
            AlignedBuf::zeroed(BLOCK),
            AlignedBuf::zeroed(BLOCK),
            AlignedBuf::zeroed(BLOCK),
        ];
        for (i, b) in bufs.iter_mut().enumerate() {
            b.as_mut_slice()
                .copy_from_slice(&data[i * BLOCK..(i + 1) * BLOCK]);
        }
        // SAFETY: the buffers live until the completions are collected.
        unsafe {
            e.push(
                1,
                write_op(file_b.as_raw_fd(), BLOCK as u64, bufs[0].as_slice()),
            )
            .unwrap();
            e.push(
                2,
                write_op(file_a.as_raw_fd(), 2 * BLOCK as u64, bufs[1].as_slice()),
            )
            .unwrap();
            e.push(3, write_op(file_c.as_raw_fd(), 0, bufs[2].as_slice()))
                .unwrap();
        }
        let done = collect(e.as_mut(), 3);
        assert!(
            done.iter().all(|c| c.result == BLOCK as i32),
            "{kind:?}: {done:?}"
        );
        // SAFETY: no buffer; the fsync completes before the engine goes.
        unsafe {
            e.push(
                4,
                Op::Fsync {
                    fd: file_b.as_raw_fd(),
                },
            )
            .unwrap()
        };
        assert_eq!(collect(e.as_mut(), 1)[0].result, 0, "{kind:?}");
        let a = std::fs::read(&path_a).unwrap();
        let b = std::fs::read(&path_b).unwrap();
        let c = std::fs::read(&path_c).unwrap();
        assert_eq!(&b[BLOCK..2 * BLOCK], &data[..BLOCK], "{kind:?}: file b");
        assert_eq!(
            &a[2 * BLOCK..3 * BLOCK],
            &data[BLOCK..2 * BLOCK],
            "{kind:?}: file a"
        );
        assert_eq!(&c[..BLOCK], &data[2 * BLOCK..], "{kind:?}: file c");
        // Reading back through the registered index gives the same bytes.
        let mut back = AlignedBuf::zeroed(BLOCK);
        // SAFETY: `back` lives until the completion is collected.
        unsafe {
            e.push(
                5,
                read_op(file_b.as_raw_fd(), BLOCK as u64, back.as_mut_slice()),
            )
            .unwrap()
        };
        assert_eq!(collect(e.as_mut(), 1)[0].result, BLOCK as i32);
        assert_eq!(back.as_slice(), &data[..BLOCK], "{kind:?}: read back");
    }
}

/// `submit` + `completions_ready`, the busy-poll pair: nothing is ready with nothing in
/// flight; once submitted, an op's completion is seen from memory alone (io_uring's
/// completion queue, AIO's mapped completion ring) within a bounded spin, on a disk file and
/// on tmpfs, and `wait` then returns it with the data read.
#[test]
fn completions_ready_sees_completed_ops_without_wait() {
    for kind in KINDS {
        for dir in dirs() {
            let (path, file) = direct_file(dir.path(), 8, 9);
            let mut e = engine(kind, 8);
            assert!(
                !e.completions_ready(),
                "{kind:?}: ready with nothing in flight"
            );
            let mut buf = AlignedBuf::zeroed(BLOCK);
            for n in 0..8u64 {
                // SAFETY: buf lives until the completion is collected below.
                unsafe {
                    e.push(
                        n,
                        read_op(file.as_raw_fd(), n * BLOCK as u64, buf.as_mut_slice()),
                    )
                }
                .unwrap();
                e.submit().unwrap();
                let start = Instant::now();
                while !e.completions_ready() {
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "{kind:?} in {}: a submitted read never showed as ready",
                        dir.path().display()
                    );
                    std::hint::spin_loop();
                }
                let mut out = Vec::new();
                e.wait(0, Some(Duration::ZERO), &mut out).unwrap();
                assert_eq!(
                    out,
                    [Completion {
                        token: n,
                        result: BLOCK as i32
                    }],
                    "{kind:?}"
                );
                assert_eq!(
                    buf.as_slice(),
                    pattern(9, n as usize).as_slice(),
                    "{kind:?}"
                );
                assert!(
                    !e.completions_ready(),
                    "{kind:?}: still ready once collected"
                );
            }
            drop(path);
        }
    }
}

/// Files in memory (`set_memory_files`): writes, reads, a sync, a short read and an error
/// give what the engine's own path gives, with more ops than the engine is deep. Native AIO
/// does them as they are pushed (the data is in the file, and the completions ready,
/// before any `submit` or `wait`), yet still returns them from `wait` and counts them in
/// flight until then. Once the set is cleared, ops go through the engine again.
#[test]
fn memory_files_complete_through_wait() {
    for kind in KINDS {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let blocks = 40;
        let (path, file) = direct_file(dir.path(), blocks, 31);
        let fd = file.as_raw_fd();
        let write_only = OpenOptions::new().write(true).open(&path).unwrap();
        let mut e = engine(kind, 8);
        e.set_memory_files(&[fd, write_only.as_raw_fd()]).unwrap();

        let wbuf = push_scattered_writes(e.as_mut(), fd, blocks, 32, 7);
        assert_eq!(e.in_flight(), blocks, "{kind:?}");
        if kind == EngineKind::Aio {
            assert!(
                e.completions_ready(),
                "AIO: memory-file writes not done at push"
            );
            assert!(
                std::fs::read(&path).unwrap() == wbuf.as_slice(),
                "AIO: the writes are not in the file before any submit"
            );
        }
        let done = collect(e.as_mut(), blocks);
        assert!(
            done.iter()
                .enumerate()
                .all(|(n, c)| c.token == n as u64 && c.result == BLOCK as i32),
            "{kind:?}: {done:?}"
        );
        assert_eq!(e.in_flight(), 0, "{kind:?}");
        assert!(
            std::fs::read(&path).unwrap() == wbuf.as_slice(),
            "{kind:?}: written data differs"
        );

        // SAFETY: an fsync carries no buffer.
        unsafe { e.push(100, Op::Fsync { fd }) }.unwrap();
        let mut tail = AlignedBuf::zeroed(2 * BLOCK);
        let mut past_end = AlignedBuf::zeroed(BLOCK);
        let mut refused = vec![0u8; BLOCK];
        // SAFETY: the buffers live until the completions are collected.
        unsafe {
            let end = (blocks * BLOCK) as u64;
            e.push(101, read_op(fd, end - BLOCK as u64, tail.as_mut_slice()))
                .unwrap();
            e.push(102, read_op(fd, end, past_end.as_mut_slice()))
                .unwrap();
            e.push(103, read_op(write_only.as_raw_fd(), 0, &mut refused))
                .unwrap();
        }
        let expected = [(100, 0), (101, BLOCK as i32), (102, 0), (103, -libc::EBADF)];
        let done: Vec<_> = collect(e.as_mut(), 4)
            .iter()
            .map(|c| (c.token, c.result))
            .collect();
        assert_eq!(done, expected, "{kind:?}");
        assert_eq!(
            &tail.as_slice()[..BLOCK],
            &wbuf.as_slice()[(blocks - 1) * BLOCK..]
        );
        assert_eq!(refused, vec![0u8; BLOCK], "{kind:?}: a refused read wrote");

        e.set_memory_files(&[]).unwrap();
        let mut back = AlignedBuf::zeroed(BLOCK);
        // SAFETY: `back` lives until the completion is collected.
        unsafe { e.push(200, read_op(fd, 0, back.as_mut_slice())) }.unwrap();
        if kind == EngineKind::Aio {
            assert!(
                !e.completions_ready(),
                "AIO: done at push after the set was cleared"
            );
        }
        assert_eq!(collect(e.as_mut(), 1)[0].result, BLOCK as i32, "{kind:?}");
        assert_eq!(back.as_slice(), &wbuf.as_slice()[..BLOCK], "{kind:?}");
    }
}

/// Vectored writes and reads (pwritev/preadv) on O_DIRECT files, disk and tmpfs, through
/// each engine's queued path and (memory files) native AIO's immediate one: the pieces are
/// sector-sized and page-sized parts of a buffer taken out of order, as a request's
/// segments on separate guest pages are.
#[test]
fn vectored_io_scatters_and_gathers() {
    const SECTOR: usize = 512;
    for kind in KINDS {
        for dir in dirs() {
            for immediate in [false, true] {
                let blocks = 8;
                let (path, file) = direct_file(dir.path(), blocks, 41);
                let fd = file.as_raw_fd();
                let mut e = engine(kind, 8);
                if immediate {
                    e.set_memory_files(&[fd]).unwrap();
                }
                // Pieces of `memory` in file order: a whole page, then sectors from
                // further on, then pages backwards; together blocks * BLOCK bytes.
                let mut memory = AlignedBuf::zeroed(blocks * BLOCK);
                for (n, chunk) in memory.as_mut_slice().chunks_mut(BLOCK).enumerate() {
                    chunk.copy_from_slice(&pattern(42, n));
                }
                let mut pieces: Vec<(usize, usize)> = vec![(7 * BLOCK, BLOCK)];
                pieces.extend((0..8).map(|s| (6 * BLOCK + (7 - s) * SECTOR, SECTOR)));
                pieces.extend((0..6).rev().map(|n| (n * BLOCK, BLOCK)));
                let base = memory.as_mut_slice().as_mut_ptr();
                let iov: Vec<libc::iovec> = pieces
                    .iter()
                    .map(|&(at, len)| libc::iovec {
                        iov_base: base.wrapping_add(at).cast(),
                        iov_len: len,
                    })
                    .collect();
                let expected: Vec<u8> = pieces
                    .iter()
                    .flat_map(|&(at, len)| memory.as_slice()[at..at + len].to_vec())
                    .collect();
                let op = Op::Writev {
                    fd,
                    offset: 0,
                    iov: iov.as_ptr(),
                    iovcnt: iov.len() as u32,
                };
                // SAFETY: `iov` and `memory` live until the completion is collected.
                unsafe { e.push(1, op) }.unwrap();
                let done = collect(e.as_mut(), 1);
                assert_eq!(done[0].result, (blocks * BLOCK) as i32, "{kind:?}");
                assert!(
                    std::fs::read(&path).unwrap() == expected,
                    "{kind:?} {} immediate={immediate}: gathered write differs",
                    path.display()
                );

                // Read it back into the same pieces of a cleared buffer, from block 1 on,
                // so the last piece is short of data (a short read, returned as is).
                memory.as_mut_slice().fill(0);
                let op = Op::Readv {
                    fd,
                    offset: BLOCK as u64,
                    iov: iov.as_ptr(),
                    iovcnt: iov.len() as u32,
                };
                // SAFETY: as above.
                unsafe { e.push(2, op) }.unwrap();
                let done = collect(e.as_mut(), 1);
                assert_eq!(done[0].result, ((blocks - 1) * BLOCK) as i32, "{kind:?}");
                let read: Vec<u8> = pieces
                    .iter()
                    .flat_map(|&(at, len)| memory.as_slice()[at..at + len].to_vec())
                    .collect();
                assert!(
                    read[..(blocks - 1) * BLOCK] == expected[BLOCK..],
                    "{kind:?} immediate={immediate}: scattered read differs"
                );
                assert!(read[(blocks - 1) * BLOCK..].iter().all(|&b| b == 0));
            }
        }
    }
}
