//! Per-block sector bitmaps (bit set = the sector is stored in this file; sector 0 is the
//! most significant bit of byte 0) and a bounded cache of them that readers use without a
//! lock.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::error::Result;

pub fn test_bit(bits: &[u8], n: usize) -> bool {
    bits[n >> 3] & (0x80 >> (n & 7)) != 0
}

pub fn set_bit(bits: &mut [u8], n: usize) {
    bits[n >> 3] |= 0x80 >> (n & 7);
}

/// Set bits `[start, end)`; returns whether any bit changed.
pub fn set_range(bits: &mut [u8], start: usize, end: usize) -> bool {
    let mut changed = false;
    for n in start..end {
        if !test_bit(bits, n) {
            set_bit(bits, n);
            changed = true;
        }
    }
    changed
}

/// The value of bit `start` and how many bits from `start` share it, at most `limit`.
pub fn run(bits: &[u8], start: usize, limit: usize) -> (bool, usize) {
    let value = test_bit(bits, start);
    let uniform = if value { 0xff } else { 0x00 };
    let mut n = start + 1;
    let end = start + limit;
    while n < end {
        if n.is_multiple_of(8) && n + 8 <= end && bits[n >> 3] == uniform {
            n += 8;
            continue;
        }
        if test_bit(bits, n) != value {
            break;
        }
        n += 1;
    }
    (value, n.min(end) - start)
}

/// Every one of the first `count` bits is set.
pub fn all_set(bits: &[u8], count: usize) -> bool {
    run(bits, 0, count) == (true, count)
}

/// One block's bitmap as it is on disk.
pub struct CachedBitmap {
    pub block: u32,
    pub bits: Box<[u8]>,
}

/// Bytes of bitmaps the cache holds at most (plus one small header per slot).
pub const BITMAP_CACHE_BYTES: u64 = 4 << 20;
const MIN_SLOTS: u64 = 16;
const MAX_SLOTS: u64 = 8192;

/// A direct-mapped cache of block bitmaps: slot `block % slots`.
///
/// Memory bound: `slots * bitmap_bytes` with `slots = clamp(4 MiB / bitmap_bytes, 16,
/// 8192)`, so at most 4 MiB of bitmaps for blocks of 2 MiB (512-byte bitmaps, 8192 slots,
/// covering 16 GiB of hot data) and at most 1 MiB for the largest blocks (64 KiB bitmaps,
/// 16 slots).
///
/// Readers take no lock: a hit is one atomic load. A miss reads the bitmap from the file
/// and installs it with compare-and-swap against the slot value seen *before* the read.
/// Writers (serialized by the image's allocation lock) store every bitmap they change,
/// after writing it to the file, so a reader that read the file before that store cannot
/// install its stale copy: its compare-and-swap fails.
pub struct BitmapCache {
    slots: Box<[ArcSwapOption<CachedBitmap>]>,
}

impl BitmapCache {
    pub fn new(bitmap_bytes: u64) -> BitmapCache {
        let count = (BITMAP_CACHE_BYTES / bitmap_bytes.max(1)).clamp(MIN_SLOTS, MAX_SLOTS);
        BitmapCache {
            slots: (0..count).map(|_| ArcSwapOption::empty()).collect(),
        }
    }

    fn slot(&self, block: u32) -> &ArcSwapOption<CachedBitmap> {
        &self.slots[block as usize % self.slots.len()]
    }

    /// Run `f` on the bitmap of `block`, from the cache or else from `load`. A hit takes
    /// no reference count (arc-swap's guard), so threads sharing a slot do not contend.
    pub fn with<R>(
        &self,
        block: u32,
        load: impl FnOnce() -> Result<Box<[u8]>>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        let slot = self.slot(block);
        let seen = slot.load();
        if let Some(cached) = seen.as_ref() {
            if cached.block == block {
                return Ok(f(&cached.bits));
            }
        }
        let fresh = Arc::new(CachedBitmap {
            block,
            bits: load()?,
        });
        let result = f(&fresh.bits);
        slot.compare_and_swap(&seen, Some(fresh));
        Ok(result)
    }

    /// Run `f` on the bitmap of `block` if it is cached; `None` otherwise.
    pub fn with_cached<R>(&self, block: u32, f: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let seen = self.slot(block).load();
        seen.as_ref()
            .filter(|cached| cached.block == block)
            .map(|cached| f(&cached.bits))
    }

    /// Record the new on-disk bitmap of `block` (after it was written to the file).
    pub fn store(&self, block: u32, bits: Box<[u8]>) {
        self.slot(block)
            .store(Some(Arc::new(CachedBitmap { block, bits })));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_follow_bit_order() {
        let mut bits = vec![0u8; 4];
        set_range(&mut bits, 3, 20);
        assert_eq!(bits[0], 0b0001_1111);
        assert_eq!(run(&bits, 0, 32), (false, 3));
        assert_eq!(run(&bits, 3, 32), (true, 17));
        assert_eq!(run(&bits, 5, 4), (true, 4));
        assert_eq!(run(&bits, 20, 12), (false, 12));
        assert!(!all_set(&bits, 32));
        set_range(&mut bits, 0, 32);
        assert!(all_set(&bits, 32));
        bits[3] &= !1;
        assert!(!all_set(&bits, 32));
    }

    /// A reader that read the file before a writer stored a newer bitmap must not install
    /// its stale copy (the writer's store happens inside the reader's load here).
    #[test]
    fn stale_reader_cannot_overwrite_a_writers_store() {
        let cache = BitmapCache::new(512);
        let stale = cache
            .with(
                3,
                || {
                    cache.store(3, vec![9u8; 512].into_boxed_slice());
                    Ok(vec![1u8; 512].into_boxed_slice())
                },
                |bits| bits[0],
            )
            .expect("load");
        assert_eq!(stale, 1, "the reader still uses what it read");
        let cached = cache
            .with(3, || panic!("hit"), |bits| bits[0])
            .expect("hit");
        assert_eq!(cached, 9, "the writer's bitmap stays cached");
    }

    #[test]
    fn cache_serves_hits_and_replaces_on_store() {
        let cache = BitmapCache::new(512);
        let first = cache
            .with(7, || Ok(vec![1u8; 512].into_boxed_slice()), |b| b[0])
            .expect("load");
        assert_eq!(first, 1);
        let hit = cache
            .with(7, || panic!("must be a hit"), |b| b[0])
            .expect("hit");
        assert_eq!(hit, 1);
        cache.store(7, vec![2u8; 512].into_boxed_slice());
        let updated = cache.with(7, || panic!("hit"), |b| b[0]).expect("hit");
        assert_eq!(updated, 2);
        assert_eq!(cache.with_cached(7, |b| b[0]), Some(2));
        // Block 7 + slots shares the slot but is not the block cached there.
        let aliased = 7 + cache.slots.len() as u32;
        assert_eq!(cache.with_cached(aliased, |b| b[0]), None);
        assert_eq!(cache.with_cached(8, |b| b[0]), None);
    }
}
