//! Requests as Linux xen-blkfront really sends them, where it differs from what the
//! simulated frontends send; each case was found against a real blkfront in the xenlab
//! (tests/xen/first-contact) and is replayed here on xensim.

mod common;

use common::blkif::{ask, direct, granted_frame, whole_page, WAIT};
use common::host::SimHost;
use ferrotap::blkif::{op, status};
use ferrotap::xensim::blkfront::{Blkfront, FrontConfig};
use serde_json::json;

/// blk-mq builds its flush request with blk_rq_init, which leaves the sector at
/// (sector_t)-1, and blkfront copies it into the ring as is: an empty FLUSH_DISKCACHE (or
/// WRITE_BARRIER) names no range, so its sector must not be checked. Before the fix every
/// fsync in the guest got ERROR, which blkfront turns into "flush not supported".
#[test]
fn empty_flush_with_blk_mq_sector_is_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let host = SimHost::new();
    let serve = host.serve("vbd", &image, &[]);
    let mut config = FrontConfig::new(host.path().to_path_buf(), serve.control.clone());
    config.response_timeout = WAIT;
    let mut fe = Blkfront::connect(&config).unwrap();

    let (gref, _) = granted_frame(&fe, false);
    let whole_page = whole_page(gref);
    let cases = [
        // (request, expected status)
        (direct(op::FLUSH_DISKCACHE, 1, u64::MAX, &[]), status::OKAY),
        (direct(op::WRITE_BARRIER, 2, u64::MAX, &[]), status::OKAY),
        (direct(op::FLUSH_DISKCACHE, 3, 2047, &[]), status::OKAY),
        // With data the range is checked as for any write.
        (
            direct(op::FLUSH_DISKCACHE, 4, u64::MAX, &[whole_page]),
            status::ERROR,
        ),
        (
            direct(op::FLUSH_DISKCACHE, 5, 2047, &[whole_page]),
            status::ERROR,
        ),
        (
            direct(op::FLUSH_DISKCACHE, 6, 2040, &[whole_page]),
            status::OKAY,
        ),
    ];
    for (request, expected) in &cases {
        let response = ask(&mut fe, 0, request);
        assert_eq!(response.id, request.id, "{request:?}");
        assert_eq!(response.operation, request.operation, "{request:?}");
        assert_eq!(response.status, *expected, "{request:?}");
    }
    let stats = serve.ctl(&json!({"op": "stats"}));
    let q = &stats["queues"][0];
    assert_eq!(q["requests"], 6, "{stats}");
    assert_eq!(q["errors"], 2, "{stats}");
    assert_eq!(q["flushes"], 4, "{stats}");
}
