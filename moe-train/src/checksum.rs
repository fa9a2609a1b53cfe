//! Checksums as the program writes them: SHA-256 digests in lower-case hex, shortened in
//! messages. Used for corpora, downloads, configs and checkpoint files alike.

use std::io::Read;
use std::path::Path;

use sha2::Digest;

use crate::error::{io, Result};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The first 12 hex digits of a checksum, enough to tell two apart in a message.
pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// Feeds the file at `path` into `hasher` in reads of 1 MiB (files of gigabytes never sit in
/// memory whole), calling `progress` with the size of each read; returns the bytes read.
pub fn hash_file<D: Digest>(
    path: &Path,
    hasher: &mut D,
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(io(path))?;
        if read == 0 {
            return Ok(bytes);
        }
        bytes += read as u64;
        hasher.update(&buffer[..read]);
        progress(read as u64);
    }
}
