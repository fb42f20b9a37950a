//! Parent locators and the parent name, encoded as Windows, blktap and vhd-util expect:
//! W2ku holds the absolute path and W2ru the path relative to the child (".\" first), both
//! UTF-16LE with backslashes; MacX holds a UTF-8 `file://` URL of the absolute path; the
//! header's parent name is the parent's file name in UTF-16BE.

use std::path::{Component, Path, PathBuf};

use super::header::{PLATFORM_MACX, PLATFORM_W2KU, PLATFORM_W2RU};
use crate::error::{Error, Result};

/// Longest locator payload ferrotap reads or writes (paths are far shorter).
pub const MAX_LOCATOR_BYTES: u64 = 64 * 1024;

fn utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn windows_separators(path: &str) -> String {
    path.replace('/', "\\")
}

/// W2ku payload: the absolute path, '/' written as '\' (as blktap does).
pub fn encode_w2ku(absolute: &Path) -> Vec<u8> {
    utf16le(&windows_separators(&absolute.to_string_lossy()))
}

/// W2ru payload: the relative path, starting with ".\" as Windows requires.
pub fn encode_w2ru(relative: &Path) -> Vec<u8> {
    let text = relative.to_string_lossy();
    let text = text.strip_prefix("./").unwrap_or(&text);
    utf16le(&format!(".\\{}", windows_separators(text)))
}

/// MacX payload: a file URL of the absolute path.
pub fn encode_macx(absolute: &Path) -> Vec<u8> {
    format!("file://{}", absolute.to_string_lossy()).into_bytes()
}

/// Decode a locator payload into a path (relative paths are relative to the child's
/// directory); `None` when the code is not one ferrotap reads or the payload is garbled.
pub fn decode(code: u32, payload: &[u8]) -> Option<String> {
    let text = match code {
        PLATFORM_W2KU | PLATFORM_W2RU => {
            if !payload.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = payload
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .take_while(|&u| u != 0)
                .collect();
            let text = String::from_utf16(&units).ok()?.replace('\\', "/");
            let text = text
                .strip_prefix("C:")
                .or_else(|| text.strip_prefix("c:"))
                .map(str::to_string)
                .unwrap_or(text);
            text
        }
        PLATFORM_MACX => {
            let end = payload
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(payload.len());
            let text = std::str::from_utf8(&payload[..end]).ok()?;
            text.strip_prefix("file://")?.to_string()
        }
        _ => return None,
    };
    // "./name" and "name" are the same relative path; keep the plain form.
    let text = text.strip_prefix("./").map(str::to_string).unwrap_or(text);
    if text.is_empty() {
        None
    } else {
        Some(text)
    }
}

/// The header's parent name field: `name` in UTF-16BE, zero padded to 512 bytes.
pub fn encode_parent_name(name: &str) -> Result<[u8; 512]> {
    let mut field = [0u8; 512];
    let bytes: Vec<u8> = name.encode_utf16().flat_map(u16::to_be_bytes).collect();
    if bytes.len() > field.len() {
        return Err(Error::invalid(format!(
            "parent file name '{name}' is longer than the 256 UTF-16 units a VHD header holds"
        )));
    }
    field[..bytes.len()].copy_from_slice(&bytes);
    Ok(field)
}

pub fn decode_parent_name(field: &[u8; 512]) -> String {
    let units: Vec<u16> = field
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// `to` relative to the directory `from_dir` (both absolute and normalized).
pub fn relative_path(from_dir: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from_dir.components().collect();
    let target: Vec<Component> = to.components().collect();
    let common = from
        .iter()
        .zip(target.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let mut relative = PathBuf::new();
    for _ in common..from.len() {
        relative.push("..");
    }
    for component in &target[common..] {
        relative.push(component.as_os_str());
    }
    if relative.as_os_str().is_empty() {
        relative.push(".");
    }
    if !relative.starts_with("..") {
        relative = Path::new(".").join(relative);
    }
    relative
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_round_trip() {
        let abs = Path::new("/srv/sr/parent.vhd");
        assert_eq!(
            decode(PLATFORM_W2KU, &encode_w2ku(abs)).as_deref(),
            Some("/srv/sr/parent.vhd")
        );
        assert_eq!(
            decode(PLATFORM_MACX, &encode_macx(abs)).as_deref(),
            Some("/srv/sr/parent.vhd")
        );
        let rel = relative_path(Path::new("/srv/sr/kids"), abs);
        assert_eq!(rel, Path::new("../parent.vhd"));
        assert_eq!(
            decode(PLATFORM_W2RU, &encode_w2ru(&rel)).as_deref(),
            Some("../parent.vhd")
        );
        let same = relative_path(Path::new("/srv/sr"), abs);
        assert_eq!(
            decode(PLATFORM_W2RU, &encode_w2ru(&same)).as_deref(),
            Some("parent.vhd")
        );
    }

    #[test]
    fn parent_name_is_utf16_big_endian() {
        let field = encode_parent_name("p.vhd").expect("short name");
        assert_eq!(&field[..4], &[0, b'p', 0, b'.']);
        assert_eq!(decode_parent_name(&field), "p.vhd");
    }
}
