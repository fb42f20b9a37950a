//! The blocking side of a queue: work the engine cannot do asynchronously (allocating
//! writes that change image metadata, flushes, discards, compressed reads, I/O too unaligned
//! for O_DIRECT) runs on one helper thread per queue, so the queue thread itself only ever
//! blocks in its engine. Jobs and results travel over channels; an eventfd, watched by the
//! queue's engine, says results are waiting.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use super::memory::EventFd;
use crate::error::{Error, Result};

/// A job: runs on the worker, returns Ok or the error to log and answer as BLKIF_RSP_ERROR.
pub type Job = Box<dyn FnOnce() -> Result<()> + Send>;

/// A finished job: the token it was sent with, and its outcome.
pub struct JobResult {
    pub token: u64,
    pub result: Result<()>,
}

pub struct Worker {
    jobs: Option<Sender<(u64, Job)>>,
    results: Receiver<JobResult>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    pending: usize,
}

impl Worker {
    pub fn spawn(name: String) -> Result<Worker> {
        let (job_tx, job_rx) = mpsc::channel::<(u64, Job)>();
        let (result_tx, result_rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new()?);
        let thread_wake = Arc::clone(&wake);
        let thread = thread::Builder::new()
            .name(name)
            .spawn(move || {
                while let Ok((token, job)) = job_rx.recv() {
                    let result = job();
                    if result_tx.send(JobResult { token, result }).is_err() {
                        break;
                    }
                    thread_wake.signal();
                }
            })
            .map_err(|e| Error::io("spawn worker thread", e))?;
        Ok(Worker {
            jobs: Some(job_tx),
            results: result_rx,
            wake,
            thread: Some(thread),
            pending: 0,
        })
    }

    /// The fd that becomes readable when results are waiting.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.wake.fd()
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
        Ok(())
    }

    /// Jobs submitted and not yet collected.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Collect finished jobs (after the wake fd fired, or any time).
    pub fn collect(&mut self, out: &mut Vec<JobResult>) {
        self.wake.clear();
        while let Ok(result) = self.results.try_recv() {
            self.pending -= 1;
            out.push(result);
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the job channel ends the thread once its current job is done.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
