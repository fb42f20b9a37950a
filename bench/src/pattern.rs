//! The I/O patterns every system runs: workloads, image states, and the seeded offsets.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// One of the four measured access patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    RandRead,
    RandWrite,
    SeqRead,
    SeqWrite,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::RandRead,
        Workload::RandWrite,
        Workload::SeqRead,
        Workload::SeqWrite,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::RandRead => "randread-4k",
            Workload::RandWrite => "randwrite-4k",
            Workload::SeqRead => "read-1m",
            Workload::SeqWrite => "write-1m",
        }
    }

    pub fn block_size(self) -> u64 {
        match self {
            Workload::RandRead | Workload::RandWrite => 4096,
            Workload::SeqRead | Workload::SeqWrite => 1 << 20,
        }
    }

    pub fn is_write(self) -> bool {
        matches!(self, Workload::RandWrite | Workload::SeqWrite)
    }

    pub fn is_random(self) -> bool {
        matches!(self, Workload::RandRead | Workload::RandWrite)
    }

    /// fio's `--rw` value for the same pattern.
    pub fn fio_rw(self) -> &'static str {
        match self {
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::SeqRead => "read",
            Workload::SeqWrite => "write",
        }
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name() == s)
            .ok_or_else(|| format!("unknown workload '{s}'"))
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Workload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// What the image holds when the measurement starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Every byte written beforehand: reads hit allocated data, writes overwrite in place.
    Preallocated,
    /// Freshly created: reads see unallocated space, writes allocate.
    Empty,
}

impl State {
    pub const ALL: [State; 2] = [State::Preallocated, State::Empty];

    pub fn name(self) -> &'static str {
        match self {
            State::Preallocated => "preallocated",
            State::Empty => "empty",
        }
    }

    /// Writes to an empty image stop after one pass over their slice, so that every
    /// measured write is a first write (an allocation), whatever the runtime.
    pub fn one_pass(self, workload: Workload) -> bool {
        self == State::Empty && workload.is_write()
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// splitmix64: small, fast, and good enough to spread offsets uniformly.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (n > 0), by multiply-shift rather than a biased modulo.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// The offsets one job visits: its own slice of the file, like fio's
/// `--size=SLICE --offset_increment=SLICE` with `--norandommap` for random patterns.
pub struct Offsets {
    rng: Rng,
    base: u64,
    blocks: u64,
    block_size: u64,
    random: bool,
    next_block: u64,
}

impl Offsets {
    /// Job `job` of a pattern whose jobs each own `slice` bytes.
    pub fn new(workload: Workload, seed: u64, job: u64, slice: u64) -> Offsets {
        let block_size = workload.block_size();
        Offsets {
            rng: Rng::new(seed ^ (job.wrapping_add(1)).wrapping_mul(0xa076_1d64_78bd_642f)),
            base: job * slice,
            blocks: (slice / block_size).max(1),
            block_size,
            random: workload.is_random(),
            next_block: 0,
        }
    }

    pub fn next_offset(&mut self) -> u64 {
        let block = if self.random {
            self.rng.below(self.blocks)
        } else {
            let block = self.next_block;
            // Sequential jobs wrap around at the end of their slice, as fio does.
            self.next_block = (block + 1) % self.blocks;
            block
        };
        self.base + block * self.block_size
    }

    /// Bytes in one pass over the slice.
    pub fn pass_bytes(&self) -> u64 {
        self.blocks * self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_offsets_stay_in_the_slice_and_are_block_aligned() {
        let slice = 1 << 20;
        let mut offsets = Offsets::new(Workload::RandRead, 7, 2, slice);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let off = offsets.next_offset();
            assert!((2 * slice..3 * slice).contains(&off));
            assert_eq!(off % 4096, 0);
            seen.insert(off);
        }
        // 256 blocks, 2000 draws: a uniform generator visits nearly all of them.
        assert!(seen.len() > 240, "only {} distinct blocks", seen.len());
    }

    #[test]
    fn sequential_offsets_wrap_within_the_slice() {
        let slice = 3 << 20;
        let mut offsets = Offsets::new(Workload::SeqWrite, 1, 1, slice);
        let got: Vec<u64> = (0..4).map(|_| offsets.next_offset()).collect();
        assert_eq!(got, vec![3 << 20, 4 << 20, 5 << 20, 3 << 20]);
        assert_eq!(offsets.pass_bytes(), slice);
    }

    #[test]
    fn same_seed_same_pattern() {
        let a: Vec<u64> = {
            let mut o = Offsets::new(Workload::RandWrite, 42, 0, 64 << 20);
            (0..100).map(|_| o.next_offset()).collect()
        };
        let b: Vec<u64> = {
            let mut o = Offsets::new(Workload::RandWrite, 42, 0, 64 << 20);
            (0..100).map(|_| o.next_offset()).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
        }
        assert!("randread".parse::<Workload>().is_err());
    }
}
