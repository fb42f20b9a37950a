//! Persistent grants: when the frontend offers feature-persistent it keeps its data pages
//! granted and reuses them, so each is mapped once and kept. blkif.h asks for
//! RING_SIZE * BLKIF_MAX_SEGMENTS_PER_REQUEST of them and an LRU beyond that, and lets a
//! backend keep more; pages still used by a request in flight are never evicted (the
//! request holds an `Rc`).

use std::rc::Rc;

use lru::LruCache;

use crate::blkif::{MAX_INDIRECT_SEGMENTS, MAX_SEGMENTS_PER_REQUEST, SEGMENTS_PER_INDIRECT_PAGE};
use crate::error::Result;
use crate::xen::{GrantAccess, GrantMapping, GrantRef};

/// With indirect requests a queue keeps at least this many pages mapped (about 8 MiB of
/// guest memory): eight 1 MiB requests with their indirect pages (8 x (256 + 1)), or a
/// whole ring of Linux blkfront's default 32-segment requests (32 x 33 = 1056, also Linux
/// blkback's default bound), so that such a frontend's large requests are served on its
/// own pages. Counting data pages only would leave eight such requests 8 pages short, and
/// a few of their pages grant-copied every round.
const INDIRECT_KEPT_PAGES: usize =
    8 * (MAX_INDIRECT_SEGMENTS + MAX_INDIRECT_SEGMENTS.div_ceil(SEGMENTS_PER_INDIRECT_PAGE));

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

/// The kept pages, in order of last use. Lookups and insertions are O(1); eviction walks
/// from the least recently used end past the pages requests in flight still hold, which
/// were used recently and so are seldom there (when every kept page is held it walks them
/// all, at most the bound).
pub struct PersistentGrants {
    pages: LruCache<GrantRef, MappedPage>,
    limit: usize,
}

impl PersistentGrants {
    pub fn new(limit: usize) -> PersistentGrants {
        PersistentGrants {
            pages: LruCache::unbounded(),
            limit,
        }
    }

    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether a request on `grefs` can be served on persistent mappings without evicting
    /// any: those not mapped yet fit under the bound.
    pub fn has_room_for(&self, grefs: impl Iterator<Item = GrantRef>) -> bool {
        let missing = grefs.filter(|gref| !self.pages.contains(gref)).count();
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
        if let Some(page) = self.pages.get(&gref) {
            if page.writable() || !write {
                return Ok(Rc::clone(page));
            }
        }
        let mapping = match access.map(&[gref], true) {
            Ok(mapping) => mapping,
            Err(err) if write => return Err(err),
            Err(_) => access.map(&[gref], false)?,
        };
        let page: MappedPage = Rc::new(mapping);
        // A read-only page mapped again replaces its entry (a request holding the old one
        // keeps it until it completes). A new one needs room: when every kept page is held,
        // the page serves this request only and is unmapped after it.
        let replacing = self.pages.contains(&gref);
        if replacing || self.pages.len() < self.limit || self.evict_one() {
            self.pages.put(gref, Rc::clone(&page));
        }
        Ok(page)
    }

    /// Drop the least recently used page no request holds; false when every page is held.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .pages
            .iter()
            .rev()
            .find(|(_, page)| Rc::strong_count(page) == 1)
            .map(|(gref, _)| *gref);
        victim.is_some_and(|gref| self.pages.pop(&gref).is_some())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::error::{Error, ErrorKind};
    use crate::xen::{CopyDirection, CopySegment};

    /// Grants of a fake guest: counts the maps made and the mappings still alive.
    struct FakeGuest {
        read_only: HashSet<GrantRef>,
        maps: usize,
        live: Arc<AtomicUsize>,
    }

    struct FakeMapping {
        page: Vec<u8>,
        writable: bool,
        live: Arc<AtomicUsize>,
    }

    impl GrantMapping for FakeMapping {
        fn as_ptr(&self) -> NonNull<u8> {
            NonNull::from(&self.page[0])
        }
        fn len(&self) -> usize {
            self.page.len()
        }
        fn writable(&self) -> bool {
            self.writable
        }
    }

    impl Drop for FakeMapping {
        fn drop(&mut self) {
            self.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    impl GrantAccess for FakeGuest {
        fn map(&mut self, refs: &[GrantRef], writable: bool) -> Result<Box<dyn GrantMapping>> {
            if writable && refs.iter().any(|gref| self.read_only.contains(gref)) {
                return Err(Error::new(ErrorKind::ReadOnly, "read-only grant"));
            }
            self.maps += 1;
            self.live.fetch_add(1, Ordering::Relaxed);
            Ok(Box::new(FakeMapping {
                page: vec![0; 4096 * refs.len()],
                writable,
                live: Arc::clone(&self.live),
            }))
        }

        unsafe fn copy(&mut self, _: CopyDirection, _: &mut [CopySegment]) -> Result<()> {
            Err(Error::new(ErrorKind::Unsupported, "not used"))
        }
    }

    fn guest() -> FakeGuest {
        FakeGuest {
            read_only: HashSet::from([7]),
            maps: 0,
            live: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn live(guest: &FakeGuest) -> usize {
        guest.live.load(Ordering::Relaxed)
    }

    #[test]
    fn least_recently_used_page_is_evicted() {
        let mut guest = guest();
        let mut kept = PersistentGrants::new(3);
        for gref in [1, 2, 3, 1] {
            kept.get(&mut guest, gref, true).unwrap();
        }
        assert_eq!((guest.maps, kept.len(), live(&guest)), (3, 3, 3));
        // 2 is now the least recently used.
        kept.get(&mut guest, 4, true).unwrap();
        assert_eq!((guest.maps, kept.len(), live(&guest)), (4, 3, 3));
        kept.get(&mut guest, 1, true).unwrap();
        kept.get(&mut guest, 3, true).unwrap();
        assert_eq!(guest.maps, 4, "1 and 3 stayed mapped");
        kept.get(&mut guest, 2, true).unwrap();
        assert_eq!(guest.maps, 5, "2 was unmapped and is mapped again");
        assert_eq!(live(&guest), 3);
    }

    #[test]
    fn pages_held_by_requests_are_not_evicted() {
        let mut guest = guest();
        let mut kept = PersistentGrants::new(2);
        let held = kept.get(&mut guest, 1, true).unwrap();
        kept.get(&mut guest, 2, true).unwrap();
        // 1 is the least recently used, but held: 2 goes.
        kept.get(&mut guest, 3, true).unwrap();
        assert_eq!(live(&guest), 2, "1 and 3 mapped, 2 unmapped");
        assert_eq!(kept.len(), 2);
        kept.get(&mut guest, 1, true).unwrap();
        assert_eq!(guest.maps, 3, "1 was kept");
        drop(held);
        // Every page held: a new one serves its request and is unmapped after it.
        let a = kept.get(&mut guest, 1, true).unwrap();
        let b = kept.get(&mut guest, 3, true).unwrap();
        let transient = kept.get(&mut guest, 4, true).unwrap();
        assert_eq!((kept.len(), live(&guest)), (2, 3));
        drop(transient);
        assert_eq!(live(&guest), 2);
        drop((a, b));
        assert!(kept.has_room_for([1, 3].into_iter()));
        assert!(!kept.has_room_for([1, 5].into_iter()));
    }

    #[test]
    fn read_only_grants_are_mapped_read_only() {
        let mut guest = guest();
        let mut kept = PersistentGrants::new(4);
        let page = kept.get(&mut guest, 7, false).unwrap();
        assert!(!page.writable());
        assert!(
            kept.get(&mut guest, 7, true).is_err(),
            "a guest READ into it"
        );
        let writable = kept.get(&mut guest, 8, false).unwrap();
        assert!(writable.writable());
        assert_eq!(kept.len(), 2);
    }
}
