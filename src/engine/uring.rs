//! The io_uring engine.

use crate::error::Result;

pub struct UringEngine;

impl UringEngine {
    pub fn new(depth: u32) -> Result<UringEngine> {
        todo!("{depth}")
    }
}

impl super::Engine for UringEngine {
    fn kind(&self) -> super::EngineKind {
        super::EngineKind::Uring
    }
    fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> Result<()> {
        todo!("{regions:?}")
    }
    unsafe fn push(&mut self, token: u64, op: super::Op) -> Result<()> {
        todo!("{token} {op:?}")
    }
    fn watch_readable(&mut self, fd: std::os::fd::RawFd, token: u64) -> Result<()> {
        todo!("{fd} {token}")
    }
    fn wait(
        &mut self,
        min_complete: usize,
        timeout: Option<std::time::Duration>,
        out: &mut Vec<super::Completion>,
    ) -> Result<()> {
        todo!("{min_complete} {timeout:?} {out:?}")
    }
    fn in_flight(&self) -> usize {
        todo!()
    }
}
