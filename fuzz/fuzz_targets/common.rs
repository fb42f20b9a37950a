//! Shared by the fuzz targets: put the input in a file, open it as the given format and
//! exercise every parser path (open, check, map, read, and a write on a copy).

use std::io::Write;

use ferrotap::image::{open_layer, Format, Image, OpenMode};

pub fn exercise(format: Format, data: &[u8]) {
    let Ok((path, mut file)) = tempfile_in_shm() else {
        return;
    };
    if file.write_all(data).is_err() {
        return;
    }
    drop(file);
    let mode = OpenMode::read_write();
    if let Ok(layer) = open_layer(&path, Some(format), mode) {
        let _ = layer.check();
        let size = layer.virtual_size();
        let image = match Image::from_layers(vec![layer]) {
            Ok(image) => image,
            Err(_) => return,
        };
        // Probe a few places, bounded so a huge virtual size cannot make a run slow.
        let mut buf = vec![0u8; 4096];
        for offset in [0, size / 2, size.saturating_sub(4096)] {
            let len = (size - offset.min(size)).min(4096) as usize;
            if len == 0 {
                continue;
            }
            let _ = image.read_at(&mut buf[..len], offset);
            let _ = image.block_status(offset, len as u64);
            let _ = image.write_at(&buf[..len.min(512)], offset);
            let _ = image.discard(offset, len as u64);
        }
        let _ = image.flush();
    }
    let _ = std::fs::remove_file(&path);
}

fn tempfile_in_shm() -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    let path = std::path::PathBuf::from(format!("/dev/shm/ferrotap-fuzz-{}", std::process::id()));
    let file = std::fs::File::create(&path)?;
    Ok((path, file))
}
