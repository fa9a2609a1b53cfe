//! Checksums as the program writes them: SHA-256 digests in lower-case hex, shortened in
//! messages. Used for corpora, downloads, configs and checkpoint files alike.

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The first 12 hex digits of a checksum, enough to tell two apart in a message.
pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}
