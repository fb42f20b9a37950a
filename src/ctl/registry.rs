//! The registry of running `ferrotap serve` processes: each writes
//! `$FERROTAP_RUN_DIR/serve-<pid>.json` (default directory /run/ferrotap) when it starts,
//! rewrites it when what it serves changes (connect, disconnect, unpause onto another image)
//! and removes it when it exits. `ferrotap ctl` finds a serve by pid or by VBD through it;
//! files of processes that died without removing theirs are skipped (and removed).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One serve process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub pid: u32,
    /// Its control socket.
    pub control: PathBuf,
    /// The top of the chain it serves.
    pub image: PathBuf,
    /// The VBD, once known (connect, or `serve --devid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domid: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devid: Option<u32>,
    /// The xenstore backend path the shim named at connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
}

/// FERROTAP_RUN_DIR, else /run/ferrotap.
pub fn run_dir() -> PathBuf {
    std::env::var_os("FERROTAP_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/ferrotap"))
}

fn entry_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("serve-{pid}.json"))
}

/// Write (or rewrite) `entry`'s file, atomically (a reader never sees half of it).
pub fn write(entry: &Entry) -> Result<PathBuf> {
    let dir = run_dir();
    fs::create_dir_all(&dir).map_err(|e| Error::io("create run directory", e).with_path(&dir))?;
    let path = entry_path(&dir, entry.pid);
    let temporary = dir.join(format!(".serve-{}.json.tmp", entry.pid));
    let text = serde_json::to_string(entry)
        .map_err(|e| Error::invalid(format!("encode registry entry: {e}")))?;
    fs::write(&temporary, text)
        .map_err(|e| Error::io("write registry entry", e).with_path(&temporary))?;
    fs::rename(&temporary, &path)
        .map_err(|e| Error::io("rename registry entry", e).with_path(&path))?;
    Ok(path)
}

/// Remove the file of `pid`.
pub fn remove(pid: u32) {
    let _ = fs::remove_file(entry_path(&run_dir(), pid));
}

/// Whether process `pid` exists (Linux: it has a /proc entry).
pub fn alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Every live serve's entry, by pid. Entries of dead processes are removed on the way.
pub fn list() -> Result<Vec<Entry>> {
    let dir = run_dir();
    let read = match fs::read_dir(&dir) {
        Ok(read) => read,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list run directory", e).with_path(&dir)),
    };
    let mut entries = Vec::new();
    for item in read.flatten() {
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("serve-") && name.ends_with(".json")) {
            continue;
        }
        let path = item.path();
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let Ok(entry) = serde_json::from_str::<Entry>(&text) else {
            continue;
        };
        if alive(entry.pid) {
            entries.push(entry);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
    entries.sort_by_key(|e| e.pid);
    Ok(entries)
}
