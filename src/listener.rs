//! Unix sockets that appear at their path only once they listen.
//!
//! `UnixListener::bind` creates the socket file at bind(2) and listens at listen(2); a
//! client that waits for the file and connects at once (a test, the real-Xen lab's script,
//! a toolstack script) is refused if it connects in between, which happened once in CI.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The longest socket path `sun_path` holds (108 bytes with the NUL).
const SOCKET_PATH_MAX: usize = 107;

/// A unix socket listening at `path`, bound and listening under a temporary name beside it
/// and then renamed into place. A socket left at `path` by an earlier server is replaced
/// (or removed first where the temporary name would not fit a socket address, and the
/// socket is bound in place); anything else there is refused (AlreadyExists), never
/// overwritten or removed.
pub fn bind_listening(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".{}", std::process::id()));
    let temp = PathBuf::from(temp);
    if temp.as_os_str().len() > SOCKET_PATH_MAX {
        // Only a socket (or nothing) is at `path` here, checked above.
        let _ = std::fs::remove_file(path);
        return UnixListener::bind(path);
    }
    let _ = std::fs::remove_file(&temp);
    let listener = UnixListener::bind(&temp)?;
    if let Err(err) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return Err(err);
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    /// The socket is at its path, listening, and nothing else is left in the directory,
    /// for a short path (bound beside it and renamed) and for one whose temporary name
    /// would not fit a socket address (bound in place), each over a socket left by an
    /// earlier server; a file that is not a socket is refused and left as it was.
    #[test]
    fn a_socket_appears_listening_and_a_file_is_left_alone() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let short = dir.path().join("ctl");
        let name_len = SOCKET_PATH_MAX - dir.path().as_os_str().len() - 1;
        let longest = dir.path().join("c".repeat(name_len));
        for path in [short, longest] {
            drop(UnixListener::bind(&path).unwrap());
            let listener = bind_listening(&path).unwrap();
            let mut client = UnixStream::connect(&path).unwrap();
            let (mut accepted, _) = listener.accept().unwrap();
            client.write_all(b"x").unwrap();
            let mut byte = [0u8];
            accepted.read_exact(&mut byte).unwrap();
            assert_eq!(&byte, b"x", "{}", path.display());
            let names: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().file_name())
                .collect();
            assert_eq!(names, [path.file_name().unwrap()], "{}", path.display());
            std::fs::remove_file(&path).unwrap();
        }
        let file = dir.path().join("data");
        std::fs::write(&file, b"keep").unwrap();
        let err = bind_listening(&file).map(drop).expect_err("a regular file");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
