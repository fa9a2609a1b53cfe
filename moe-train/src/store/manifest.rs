//! A checkpoint's proof of its own files: the size and SHA-256 of each, recorded twice (in
//! `state.json` for the files written before it, and in `manifest.json`, written last, for
//! every file), and [`verify`], which checks a checkpoint's files against both records.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::checkpoint::{read_json, sync, MANIFEST_FILE, STATE_FILE};
use crate::checksum::{hash_file, hex, short};
use crate::error::{io, Result, TrainError};

/// The checksums `state.json` records (none in checkpoints written before it recorded them).
#[derive(Deserialize)]
struct StateFileChecksums {
    #[serde(default)]
    files: BTreeMap<String, FileEntry>,
}

/// Size and SHA-256 of each file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// By file name.
    pub files: BTreeMap<String, FileEntry>,
}

/// One file of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, in hex.
    pub sha256: String,
}

/// Size and checksum of every file in `folder` (each synced to disk on the way).
pub(super) fn checksums_of(folder: &Path) -> Result<BTreeMap<String, FileEntry>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(folder).map_err(io(folder))? {
        let path = entry.map_err(io(folder))?.path();
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().to_string())
            .unwrap_or_default();
        files.insert(name, file_entry(&path)?);
        sync(&path)?;
    }
    Ok(files)
}

/// Checks every file of a checkpoint against the sizes and checksums recorded for it: the
/// manifest's and those in `state.json` (either alone is enough to check every file). A
/// checkpoint with neither record cannot be verified and is refused, naming `--no-verify`.
pub fn verify(folder: &Path) -> Result<()> {
    let manifest_path = folder.join(MANIFEST_FILE);
    let manifest = if manifest_path.exists() {
        read_json::<Manifest>(&manifest_path)?.files
    } else {
        BTreeMap::new()
    };
    let in_state = recorded_in_state(folder);
    if manifest.is_empty() && in_state.is_empty() {
        return Err(TrainError::Checkpoint {
            path: folder.to_path_buf(),
            reason: format!(
                "cannot be verified: it has no {MANIFEST_FILE} and its {STATE_FILE} records no checksums (written by an older burn-moe, or its manifest was deleted), so a damaged or swapped file would go unnoticed; if you trust its files, pass `--no-verify` to load it unchecked"
            ),
        });
    }
    let records = [(MANIFEST_FILE, &manifest), (STATE_FILE, &in_state)];
    // `state.json` first: when it is what changed, its own record is not to be believed.
    let mut names: Vec<&String> = manifest.keys().chain(in_state.keys()).collect();
    names.sort_by_key(|name| (name.as_str() != STATE_FILE, name.as_str()));
    names.dedup();
    for name in names {
        let file = folder.join(name);
        if !file.exists() {
            return Err(TrainError::Checkpoint {
                path: file,
                reason: "missing: deleted after the checkpoint was written".into(),
            });
        }
        let actual = file_entry(&file)?;
        for (record, files) in records {
            if let Some(expected) = files.get(name).filter(|expected| **expected != actual) {
                return Err(TrainError::Checkpoint {
                    path: file,
                    reason: format!(
                        "changed or damaged after the checkpoint was written ({} bytes, sha256 {}; {record} says {} bytes, sha256 {})",
                        actual.bytes,
                        short(&actual.sha256),
                        expected.bytes,
                        short(&expected.sha256)
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The checksums `state.json` records (empty when it records none or cannot be read: reading
/// the state reports that).
fn recorded_in_state(folder: &Path) -> BTreeMap<String, FileEntry> {
    std::fs::read_to_string(folder.join(STATE_FILE))
        .ok()
        .and_then(|text| serde_json::from_str::<StateFileChecksums>(&text).ok())
        .map(|record| record.files)
        .unwrap_or_default()
}

/// Size and SHA-256 of a file.
pub(super) fn file_entry(path: &Path) -> Result<FileEntry> {
    let mut hasher = Sha256::new();
    let bytes = hash_file(path, &mut hasher, |_| {})?;
    Ok(FileEntry {
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}
