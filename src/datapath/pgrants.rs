//! Persistent grants: when the frontend offers feature-persistent it keeps its data pages
//! granted and reuses them, so each is mapped once and kept. blkif.h asks for
//! RING_SIZE * BLKIF_MAX_SEGMENTS_PER_REQUEST of them and an LRU beyond that, and lets a
//! backend keep more; pages still used by a request in flight are never evicted (the
//! request holds an `Rc`).

use std::collections::HashMap;
use std::rc::Rc;

use crate::blkif::MAX_SEGMENTS_PER_REQUEST;
use crate::error::Result;
use crate::xen::{GrantAccess, GrantMapping, GrantRef};

/// With indirect requests a queue keeps at least this many pages mapped (8 MiB of guest
/// memory): a whole ring of Linux blkfront's default 32-segment requests (32 x 33 = 1056,
/// also Linux blkback's default bound) or eight 1 MiB requests, so that such a frontend's
/// large requests are served on its own pages.
const INDIRECT_KEPT_PAGES: usize = 2048;

/// How many persistent pages a queue of `ring_size` entries keeps: blkif.h's bound, and
/// with indirect requests (more than 11 segments) at least `INDIRECT_KEPT_PAGES`.
pub fn kept_pages(ring_size: usize, max_segments: usize) -> usize {
    let bound = ring_size * MAX_SEGMENTS_PER_REQUEST;
    if max_segments > MAX_SEGMENTS_PER_REQUEST {
        bound.max(INDIRECT_KEPT_PAGES)
    } else {
        bound
    }
}

/// One mapped guest page.
pub type MappedPage = Rc<Box<dyn GrantMapping>>;

struct Entry {
    page: MappedPage,
    last_used: u64,
}

pub struct PersistentGrants {
    pages: HashMap<GrantRef, Entry>,
    limit: usize,
    clock: u64,
}

impl PersistentGrants {
    pub fn new(limit: usize) -> PersistentGrants {
        PersistentGrants {
            pages: HashMap::with_capacity(limit.min(4096)),
            limit,
            clock: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether a request on `grefs` can be served on persistent mappings without evicting
    /// any: those not mapped yet fit under the bound.
    pub fn has_room_for(&self, grefs: impl Iterator<Item = GrantRef>) -> bool {
        let missing = grefs.filter(|gref| !self.pages.contains_key(gref)).count();
        self.pages.len() + missing <= self.limit
    }

    /// The page granted as `gref`, mapped writable when `write` (the backend writes into it:
    /// a guest READ). Persistent grants are normally read-write; a read-only grant is mapped
    /// read-only, and a cached read-only page asked for writing is mapped again.
    pub fn get(
        &mut self,
        access: &mut dyn GrantAccess,
        gref: GrantRef,
        write: bool,
    ) -> Result<MappedPage> {
        self.clock += 1;
        if let Some(entry) = self.pages.get_mut(&gref) {
            if entry.page.writable() || !write {
                entry.last_used = self.clock;
                return Ok(Rc::clone(&entry.page));
            }
        }
        let mapping = match access.map(&[gref], true) {
            Ok(mapping) => mapping,
            Err(err) if write => return Err(err),
            Err(_) => access.map(&[gref], false)?,
        };
        let page: MappedPage = Rc::new(mapping);
        if self.pages.len() >= self.limit && !self.pages.contains_key(&gref) {
            self.evict_one();
        }
        if self.pages.len() < self.limit || self.pages.contains_key(&gref) {
            self.pages.insert(
                gref,
                Entry {
                    page: Rc::clone(&page),
                    last_used: self.clock,
                },
            );
        }
        Ok(page)
    }

    /// Drop the least recently used page no request holds.
    fn evict_one(&mut self) {
        let victim = self
            .pages
            .iter()
            .filter(|(_, entry)| Rc::strong_count(&entry.page) == 1)
            .min_by_key(|(_, entry)| entry.last_used)
            .map(|(gref, _)| *gref);
        if let Some(gref) = victim {
            self.pages.remove(&gref);
        }
    }
}
