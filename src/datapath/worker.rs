//! The blocking side of a queue: work the engine cannot do asynchronously (allocating
//! writes that change image metadata, reads whose mapping needs metadata from the file,
//! flushes, discards, compressed reads, I/O too unaligned for O_DIRECT) runs on helper
//! threads of the queue, so the queue thread itself only ever blocks in its engine. Jobs
//! and results travel over channels; an eventfd, watched by the queue's engine, says
//! results are waiting.
//!
//! One thread to start with; more, up to `MAX_THREADS`, as jobs queue up behind the busy
//! ones. Each job blocks its thread for a disk round trip or more, so one thread makes the
//! queue's blocking work QD1: on a freshly opened 1 GiB VHD, whose 512 block bitmaps are
//! read on first use, the random reads of a guest at QD32 went through the worker one at a
//! time until most bitmaps were cached. Jobs carry no order between them: a request's
//! later steps (a flush after its writes, a barrier after everything before it) are sent
//! only once the earlier ones completed, and the image serializes its metadata changes
//! itself, as it does for the workers of different queues.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use parking_lot::Mutex;

use super::memory::EventFd;
use crate::error::{Error, Result};

/// Threads per queue at most. A guest keeps up to a ring's worth of requests in flight per
/// queue (32 on a one-page ring), and a job waits on the disk, not on a core.
const MAX_THREADS: usize = 8;

/// A job: runs on the worker, returns Ok or the error to log and answer as BLKIF_RSP_ERROR.
pub type Job = Box<dyn FnOnce() -> Result<()> + Send>;

/// A finished job: the token it was sent with, and its outcome.
pub struct JobResult {
    pub token: u64,
    pub result: Result<()>,
}

/// What every thread of a worker shares: the job queue (taken one job at a time), where
/// results go and the fd that says so.
struct Shared {
    jobs: Mutex<Receiver<(u64, Job)>>,
    results: Sender<JobResult>,
    wake: EventFd,
}

pub struct Worker {
    name: String,
    jobs: Option<Sender<(u64, Job)>>,
    results: Receiver<JobResult>,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    pending: usize,
}

impl Worker {
    pub fn spawn(name: String) -> Result<Worker> {
        let (job_tx, job_rx) = mpsc::channel::<(u64, Job)>();
        let (result_tx, result_rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            jobs: Mutex::new(job_rx),
            results: result_tx,
            wake: EventFd::new()?,
        });
        let mut worker = Worker {
            name,
            jobs: Some(job_tx),
            results: result_rx,
            shared,
            threads: Vec::new(),
            pending: 0,
        };
        worker.add_thread()?;
        Ok(worker)
    }

    fn add_thread(&mut self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        let thread = thread::Builder::new()
            .name(format!("{}.{}", self.name, self.threads.len()))
            .spawn(move || loop {
                // The lock is held while waiting, so one idle thread waits for the next
                // job and the others for the lock; it is let go before the job runs.
                let next = shared.jobs.lock().recv();
                let Ok((token, job)) = next else {
                    break;
                };
                let result = job();
                if shared.results.send(JobResult { token, result }).is_err() {
                    break;
                }
                shared.wake.signal();
            })
            .map_err(|e| Error::io("spawn worker thread", e))?;
        self.threads.push(thread);
        Ok(())
    }

    /// The fd that becomes readable when results are waiting.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.shared.wake.fd()
    }

    pub fn submit(&mut self, token: u64, job: Job) -> Result<()> {
        let sender = self
            .jobs
            .as_ref()
            .ok_or_else(|| Error::invalid("worker already stopped"))?;
        sender
            .send((token, job))
            .map_err(|_| Error::invalid("worker thread is gone"))?;
        self.pending += 1;
        // More jobs out than threads: one more thread, while under the limit. The job is
        // queued either way; a thread that cannot be made only leaves it waiting longer.
        if self.pending > self.threads.len() && self.threads.len() < MAX_THREADS {
            if let Err(err) = self.add_thread() {
                eprintln!("ferrotap: {}: {err}", self.name);
            }
        }
        Ok(())
    }

    /// Jobs submitted and not yet collected.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Threads running now (one, up to `MAX_THREADS` once jobs queued up).
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Collect finished jobs (after the wake fd fired, or any time).
    pub fn collect(&mut self, out: &mut Vec<JobResult>) {
        self.shared.wake.clear();
        while let Ok(result) = self.results.try_recv() {
            self.pending -= 1;
            out.push(result);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the job channel ends each thread once its current job is done.
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;

    fn collect_all(worker: &mut Worker, count: usize) -> Vec<JobResult> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut out = Vec::new();
        while out.len() < count {
            assert!(Instant::now() < deadline, "jobs did not finish");
            worker.collect(&mut out);
            thread::sleep(Duration::from_millis(1));
        }
        out
    }

    /// Blocking jobs run side by side, on threads added as they queue up (not past the
    /// limit), and every result comes back with its token.
    #[test]
    fn queued_jobs_run_side_by_side_up_to_the_limit() {
        let mut worker = Worker::spawn("test-w".into()).unwrap();
        assert_eq!(worker.threads(), 1);
        // Each job waits (10 s at most) until MAX_THREADS of them run at once, which only
        // happens with that many threads.
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs = MAX_THREADS * 2;
        for token in 0..jobs as u64 {
            let (running, most) = (Arc::clone(&running), Arc::clone(&most));
            worker
                .submit(
                    token,
                    Box::new(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        let deadline = Instant::now() + Duration::from_secs(10);
                        while most.load(Ordering::SeqCst) < MAX_THREADS && Instant::now() < deadline
                        {
                            thread::sleep(Duration::from_millis(1));
                        }
                        running.fetch_sub(1, Ordering::SeqCst);
                        if token == 3 {
                            Err(Error::invalid("job 3 fails"))
                        } else {
                            Ok(())
                        }
                    }),
                )
                .unwrap();
        }
        assert_eq!(worker.threads(), MAX_THREADS);
        let results = collect_all(&mut worker, jobs);
        assert_eq!(worker.pending(), 0);
        assert_eq!(most.load(Ordering::SeqCst), MAX_THREADS);
        let mut tokens: Vec<u64> = results.iter().map(|r| r.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..jobs as u64).collect::<Vec<_>>());
        for result in &results {
            assert_eq!(
                result.result.is_err(),
                result.token == 3,
                "job {}",
                result.token
            );
        }
    }

    /// One job at a time never needs a second thread; dropping the worker ends its threads
    /// after the job running.
    #[test]
    fn jobs_one_at_a_time_keep_one_thread() {
        let mut worker = Worker::spawn("test-w".into()).unwrap();
        for token in 0..4 {
            worker.submit(token, Box::new(|| Ok(()))).unwrap();
            let results = collect_all(&mut worker, 1);
            assert_eq!(results[0].token, token);
        }
        assert_eq!(worker.threads(), 1);
        let finished = Arc::new(AtomicUsize::new(0));
        let seen = Arc::clone(&finished);
        worker
            .submit(
                9,
                Box::new(move || {
                    thread::sleep(Duration::from_millis(50));
                    seen.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }),
            )
            .unwrap();
        drop(worker);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }
}
