//! The `linux` platform's kernel ABI (`ferrotap::xen::linux::abi`) against the real headers:
//! a C program built from <xen/sys/gntdev.h>, <xen/sys/evtchn.h> and <xen/grant_table.h>
//! (libxen-dev; the test fails when they are missing) prints every ioctl number, struct size
//! and field offset the Rust side uses, and each must match.

use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use ferrotap::xen::linux::abi::*;
use ferrotap::xen::linux::{LinuxPlatform, EVTCHN_PATH, GNTDEV_PATH};
use ferrotap::xen::Platform;

/// `name` and the C expression giving it.
const PROBES: &[(&str, &str)] = &[
    ("IOCTL_GNTDEV_MAP_GRANT_REF", "IOCTL_GNTDEV_MAP_GRANT_REF"),
    (
        "IOCTL_GNTDEV_UNMAP_GRANT_REF",
        "IOCTL_GNTDEV_UNMAP_GRANT_REF",
    ),
    ("IOCTL_GNTDEV_SET_MAX_GRANTS", "IOCTL_GNTDEV_SET_MAX_GRANTS"),
    ("IOCTL_GNTDEV_GRANT_COPY", "IOCTL_GNTDEV_GRANT_COPY"),
    ("GNTCOPY_source_gref", "GNTCOPY_source_gref"),
    ("GNTCOPY_dest_gref", "GNTCOPY_dest_gref"),
    (
        "IOCTL_EVTCHN_BIND_INTERDOMAIN",
        "IOCTL_EVTCHN_BIND_INTERDOMAIN",
    ),
    ("IOCTL_EVTCHN_UNBIND", "IOCTL_EVTCHN_UNBIND"),
    ("IOCTL_EVTCHN_NOTIFY", "IOCTL_EVTCHN_NOTIFY"),
    ("IOCTL_EVTCHN_RESET", "IOCTL_EVTCHN_RESET"),
    ("grant_ref.size", "sizeof(struct ioctl_gntdev_grant_ref)"),
    (
        "grant_ref.domid",
        "offsetof(struct ioctl_gntdev_grant_ref, domid)",
    ),
    (
        "grant_ref.ref",
        "offsetof(struct ioctl_gntdev_grant_ref, ref)",
    ),
    ("map.size", "sizeof(struct ioctl_gntdev_map_grant_ref)"),
    (
        "map.count",
        "offsetof(struct ioctl_gntdev_map_grant_ref, count)",
    ),
    (
        "map.index",
        "offsetof(struct ioctl_gntdev_map_grant_ref, index)",
    ),
    (
        "map.refs",
        "offsetof(struct ioctl_gntdev_map_grant_ref, refs)",
    ),
    ("unmap.size", "sizeof(struct ioctl_gntdev_unmap_grant_ref)"),
    (
        "unmap.index",
        "offsetof(struct ioctl_gntdev_unmap_grant_ref, index)",
    ),
    (
        "unmap.count",
        "offsetof(struct ioctl_gntdev_unmap_grant_ref, count)",
    ),
    ("max.size", "sizeof(struct ioctl_gntdev_set_max_grants)"),
    (
        "max.count",
        "offsetof(struct ioctl_gntdev_set_max_grants, count)",
    ),
    ("seg.size", "sizeof(struct ioctl_gntdev_grant_copy_segment)"),
    (
        "seg.source",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, source)",
    ),
    (
        "seg.dest",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, dest)",
    ),
    (
        "seg.len",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, len)",
    ),
    (
        "seg.flags",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, flags)",
    ),
    (
        "seg.status",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, status)",
    ),
    (
        "seg.source.size",
        "sizeof(((struct ioctl_gntdev_grant_copy_segment *)0)->source)",
    ),
    (
        "seg.source.virt",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, source.virt)",
    ),
    (
        "seg.source.foreign.ref",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.ref)",
    ),
    (
        "seg.source.foreign.offset",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.offset)",
    ),
    (
        "seg.source.foreign.domid",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, source.foreign.domid)",
    ),
    (
        "seg.dest.virt",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, dest.virt)",
    ),
    (
        "seg.dest.foreign.ref",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, dest.foreign.ref)",
    ),
    (
        "seg.dest.foreign.offset",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, dest.foreign.offset)",
    ),
    (
        "seg.dest.foreign.domid",
        "offsetof(struct ioctl_gntdev_grant_copy_segment, dest.foreign.domid)",
    ),
    ("copy.size", "sizeof(struct ioctl_gntdev_grant_copy)"),
    (
        "copy.count",
        "offsetof(struct ioctl_gntdev_grant_copy, count)",
    ),
    (
        "copy.segments",
        "offsetof(struct ioctl_gntdev_grant_copy, segments)",
    ),
    ("bind.size", "sizeof(struct ioctl_evtchn_bind_interdomain)"),
    (
        "bind.remote_domain",
        "offsetof(struct ioctl_evtchn_bind_interdomain, remote_domain)",
    ),
    (
        "bind.remote_port",
        "offsetof(struct ioctl_evtchn_bind_interdomain, remote_port)",
    ),
    ("unbind.size", "sizeof(struct ioctl_evtchn_unbind)"),
    ("unbind.port", "offsetof(struct ioctl_evtchn_unbind, port)"),
    ("notify.size", "sizeof(struct ioctl_evtchn_notify)"),
    ("notify.port", "offsetof(struct ioctl_evtchn_notify, port)"),
];

/// The same names, from the Rust definitions.
fn rust_values() -> BTreeMap<&'static str, u64> {
    type Seg = GntdevGrantCopySegment;
    let source = offset_of!(Seg, source);
    let dest = offset_of!(Seg, dest);
    let virt = offset_of!(GntdevCopyPtr, virt);
    let foreign = offset_of!(GntdevCopyPtr, foreign);
    let values: [(&str, usize); 47] = [
        (
            "IOCTL_GNTDEV_MAP_GRANT_REF",
            IOCTL_GNTDEV_MAP_GRANT_REF as usize,
        ),
        (
            "IOCTL_GNTDEV_UNMAP_GRANT_REF",
            IOCTL_GNTDEV_UNMAP_GRANT_REF as usize,
        ),
        (
            "IOCTL_GNTDEV_SET_MAX_GRANTS",
            IOCTL_GNTDEV_SET_MAX_GRANTS as usize,
        ),
        ("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY as usize),
        ("GNTCOPY_source_gref", usize::from(GNTCOPY_SOURCE_GREF)),
        ("GNTCOPY_dest_gref", usize::from(GNTCOPY_DEST_GREF)),
        (
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
            IOCTL_EVTCHN_BIND_INTERDOMAIN as usize,
        ),
        ("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND as usize),
        ("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY as usize),
        ("IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET as usize),
        ("grant_ref.size", size_of::<GntdevGrantRef>()),
        ("grant_ref.domid", offset_of!(GntdevGrantRef, domid)),
        ("grant_ref.ref", offset_of!(GntdevGrantRef, gref)),
        ("map.size", size_of::<GntdevMapGrantRef>()),
        ("map.count", offset_of!(GntdevMapGrantRef, count)),
        ("map.index", offset_of!(GntdevMapGrantRef, index)),
        ("map.refs", offset_of!(GntdevMapGrantRef, refs)),
        ("unmap.size", size_of::<GntdevUnmapGrantRef>()),
        ("unmap.index", offset_of!(GntdevUnmapGrantRef, index)),
        ("unmap.count", offset_of!(GntdevUnmapGrantRef, count)),
        ("max.size", size_of::<GntdevSetMaxGrants>()),
        ("max.count", offset_of!(GntdevSetMaxGrants, count)),
        ("seg.size", size_of::<Seg>()),
        ("seg.source", source),
        ("seg.dest", dest),
        ("seg.len", offset_of!(Seg, len)),
        ("seg.flags", offset_of!(Seg, flags)),
        ("seg.status", offset_of!(Seg, status)),
        ("seg.source.size", size_of::<GntdevCopyPtr>()),
        ("seg.source.virt", source + virt),
        (
            "seg.source.foreign.ref",
            source + foreign + offset_of!(GntdevCopyForeign, gref),
        ),
        (
            "seg.source.foreign.offset",
            source + foreign + offset_of!(GntdevCopyForeign, offset),
        ),
        (
            "seg.source.foreign.domid",
            source + foreign + offset_of!(GntdevCopyForeign, domid),
        ),
        ("seg.dest.virt", dest + virt),
        (
            "seg.dest.foreign.ref",
            dest + foreign + offset_of!(GntdevCopyForeign, gref),
        ),
        (
            "seg.dest.foreign.offset",
            dest + foreign + offset_of!(GntdevCopyForeign, offset),
        ),
        (
            "seg.dest.foreign.domid",
            dest + foreign + offset_of!(GntdevCopyForeign, domid),
        ),
        ("copy.size", size_of::<GntdevGrantCopy>()),
        ("copy.count", offset_of!(GntdevGrantCopy, count)),
        ("copy.segments", offset_of!(GntdevGrantCopy, segments)),
        ("bind.size", size_of::<EvtchnBindInterdomain>()),
        (
            "bind.remote_domain",
            offset_of!(EvtchnBindInterdomain, remote_domain),
        ),
        (
            "bind.remote_port",
            offset_of!(EvtchnBindInterdomain, remote_port),
        ),
        ("unbind.size", size_of::<EvtchnUnbind>()),
        ("unbind.port", offset_of!(EvtchnUnbind, port)),
        ("notify.size", size_of::<EvtchnNotify>()),
        ("notify.port", offset_of!(EvtchnNotify, port)),
    ];
    values
        .iter()
        .map(|&(name, value)| (name, value as u64))
        .collect()
}

/// Builds and runs the probe against the installed headers.
fn c_values(dir: &Path) -> BTreeMap<String, u64> {
    let mut source = String::from(
        "#include <stdint.h>\n#include <stddef.h>\n#include <stdio.h>\n#include <sys/ioctl.h>\n\
         #include <xen/xen.h>\n#include <xen/grant_table.h>\n\
         #include <xen/sys/gntdev.h>\n#include <xen/sys/evtchn.h>\n\
         int main(void) {\n",
    );
    for (name, expr) in PROBES {
        source.push_str(&format!(
            "    printf(\"%s %llu\\n\", \"{name}\", (unsigned long long)({expr}));\n"
        ));
    }
    source.push_str("    return 0;\n}\n");
    let c_file = dir.join("abi_probe.c");
    let binary = dir.join("abi_probe");
    std::fs::write(&c_file, source).unwrap();
    let built = Command::new("gcc")
        .args(["-Wall", "-Werror", "-o"])
        .arg(&binary)
        .arg(&c_file)
        .output()
        .expect("gcc must be installed");
    assert!(
        built.status.success(),
        "the probe must build against libxen-dev's headers (apt-get install libxen-dev):\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let run = Command::new(&binary).output().unwrap();
    assert!(run.status.success());
    String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let (name, value) = line.split_once(' ').unwrap();
            (name.to_string(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn ioctl_numbers_and_layouts_match_the_headers() {
    let dir = tempfile::tempdir().unwrap();
    let c = c_values(dir.path());
    let rust = rust_values();
    assert_eq!(c.len(), PROBES.len());
    assert_eq!(rust.len(), PROBES.len(), "every probe has a Rust value");
    let mismatches: Vec<String> = PROBES
        .iter()
        .filter(|(name, _)| c[*name] != rust[name])
        .map(|(name, _)| format!("{name}: C {} Rust {}", c[*name], rust[name]))
        .collect();
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    // The numbers the xenlab Python backend uses on a real dom0, as a second witness.
    assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x184700);
    assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x104701);
    assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x84501);
    assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x44504);
}

#[test]
fn missing_devices_give_a_clear_error() {
    if Path::new(GNTDEV_PATH).exists() {
        // A real dom0: opening must work (mapping needs a guest, see ../shared/xenlab).
        LinuxPlatform.grant_access(0, 16).unwrap();
        return;
    }
    let err = LinuxPlatform.grant_access(1, 16).err().unwrap();
    let message = err.to_string();
    assert!(message.contains(GNTDEV_PATH), "{message}");
    assert!(message.contains("not a Xen dom0"), "{message}");
    assert_eq!(err.raw_os_error(), Some(libc::ENOENT));

    assert!(!Path::new(EVTCHN_PATH).exists());
    let err = LinuxPlatform.bind_interdomain(1, 5).err().unwrap();
    assert!(err.to_string().contains(EVTCHN_PATH), "{err}");
}
