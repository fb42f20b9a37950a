//! Compressed clusters: descriptor decoding and decompression (zlib raw deflate, zstd).
//! Nothing is cached: each read decodes one cluster into a buffer of one cluster.

use std::io::Read;

use super::header::Compression;

/// Where a compressed cluster's bytes lie in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedExtent {
    pub offset: u64,
    /// Bytes from `offset` to the end of the last 512-byte sector the descriptor names
    /// (the data may end earlier; decompression stops after one cluster).
    pub len: u64,
}

impl CompressedExtent {
    /// Decode the descriptor bits (0..61) of a compressed L2 entry.
    pub fn decode(entry: u64, cluster_bits: u32) -> CompressedExtent {
        let offset_bits = 62 - (cluster_bits - 8);
        let offset = entry & ((1u64 << offset_bits) - 1);
        let sectors = ((entry >> offset_bits) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
        CompressedExtent {
            offset,
            len: sectors * 512 - (offset & 511),
        }
    }

    /// The host clusters this data touches (each carries one reference for it).
    pub fn clusters(&self, cluster_bits: u32) -> std::ops::RangeInclusive<u64> {
        (self.offset >> cluster_bits)..=((self.offset + self.len - 1) >> cluster_bits)
    }
}

/// Decompress `input` into exactly `out.len()` bytes (one cluster).
pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Zlib => {
            let mut inflater = flate2::Decompress::new(false);
            let status = inflater
                .decompress(input, out, flate2::FlushDecompress::Finish)
                .map_err(|e| format!("zlib: {e}"))?;
            let produced = inflater.total_out() as usize;
            if produced != out.len() {
                return Err(format!(
                    "zlib data decodes to {produced} bytes, not one cluster ({} bytes; {status:?})",
                    out.len()
                ));
            }
            Ok(())
        }
        Compression::Zstd => {
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| format!("zstd frame header: {e}"))?;
            decoder
                .read_exact(out)
                .map_err(|e| format!("zstd data does not decode to one cluster: {e}"))
        }
    }
}
