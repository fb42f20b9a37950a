//! The in-memory L1 table and a bounded, direct-mapped cache of L2 tables.
//!
//! Readers (`Layer::map`) never lock: they load the L1 table through an `ArcSwap`, then
//! the cache slot `l1_index % slots` through an `ArcSwapOption`, and read entries as
//! `AtomicU64`. Everything that changes a table (or replaces a slot) holds the image's
//! metadata mutex, writes the file first and then stores the new value with `Release`,
//! so a reader that sees an entry also sees the data it points at.
//!
//! Memory bound: the L1 table costs `8 * l1_size` bytes (at most 32 MiB, qemu's limit);
//! the L2 cache holds at most `slots = max(L2_CACHE_BYTES / cluster_size, MIN_SLOTS)`
//! tables of one cluster each, i.e. at most 8 MiB (8 bytes per slot pointer besides).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwapOption;

/// Budget of the L2 cache of one image.
pub const L2_CACHE_BYTES: u64 = 8 << 20;
const MIN_SLOTS: u64 = 4;

/// The active L1 table: where it lives and its entries.
pub struct L1Table {
    pub offset: u64,
    pub entries: Box<[AtomicU64]>,
}

impl L1Table {
    pub fn new(offset: u64, entries: Vec<u64>) -> L1Table {
        L1Table {
            offset,
            entries: entries.into_iter().map(AtomicU64::new).collect(),
        }
    }

    pub fn get(&self, index: u64) -> Option<u64> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map(|e| e.load(Ordering::Acquire))
    }

    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }
}

/// One L2 table as cached: the L1 index it serves and its file offset identify it.
pub struct L2Table {
    pub l1_index: u64,
    pub offset: u64,
    pub entries: Box<[AtomicU64]>,
}

impl L2Table {
    pub fn from_bytes(l1_index: u64, offset: u64, bytes: &[u8]) -> L2Table {
        L2Table {
            l1_index,
            offset,
            entries: bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    AtomicU64::new(u64::from_be_bytes(b))
                })
                .collect(),
        }
    }

    pub fn get(&self, index: u64) -> u64 {
        // index < entries.len() by construction (it is masked by l2_entries - 1).
        self.entries
            .get(index as usize)
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.entries
            .iter()
            .flat_map(|e| e.load(Ordering::Acquire).to_be_bytes())
            .collect()
    }
}

pub struct L2Cache {
    slots: Box<[ArcSwapOption<L2Table>]>,
}

impl L2Cache {
    pub fn new(cluster_size: u64) -> L2Cache {
        let slots = (L2_CACHE_BYTES / cluster_size).max(MIN_SLOTS);
        L2Cache {
            slots: (0..slots).map(|_| ArcSwapOption::empty()).collect(),
        }
    }

    fn slot(&self, l1_index: u64) -> &ArcSwapOption<L2Table> {
        &self.slots[(l1_index % self.slots.len() as u64) as usize]
    }

    /// The cached table for `l1_index` if it is the one at `offset`. Lock-free.
    pub fn get(&self, l1_index: u64, offset: u64) -> Option<Arc<L2Table>> {
        let guard = self.slot(l1_index).load();
        match &*guard {
            Some(t) if t.l1_index == l1_index && t.offset == offset => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// Install a table, evicting whatever shared its slot. Caller holds the metadata lock.
    pub fn insert(&self, table: Arc<L2Table>) {
        self.slot(table.l1_index).store(Some(table));
    }
}
