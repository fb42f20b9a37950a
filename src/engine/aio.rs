//! The Linux native AIO engine (io_setup/io_submit with an eventfd).

use crate::error::Result;

pub struct AioEngine;

impl AioEngine {
    pub fn new(depth: u32) -> Result<AioEngine> {
        todo!("{depth}")
    }
}

impl super::Engine for AioEngine {
    fn kind(&self) -> super::EngineKind {
        super::EngineKind::Aio
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
