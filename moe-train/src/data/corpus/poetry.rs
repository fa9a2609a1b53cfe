//! The default corpus: the npm package `chinese-poetry` 2.0.1 (MIT): Tang and Song poems, ci,
//! the Shijing and more, as JSON.
//!
//! On first use the package is fetched once with `npm pack` into the cache folder, its
//! sha512 checked against the registry's, and only the subsets asked for are extracted; later
//! runs read the extracted JSON directly.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::npm::{self, progress_bytes, NpmPackage};
use super::{Corpus, Document};
use crate::config::CorpusChoice;
use crate::error::{io, Result, TrainError};

/// The npm package.
pub const PACKAGE: &str = "chinese-poetry";
/// Its version.
pub const VERSION: &str = "2.0.1";
/// sha512 of `chinese-poetry-2.0.1.tgz`, as published by the npm registry (its `integrity`).
pub const SHA512: &str = "2ad60046f57b09636d6b1d276bdf899fa3e5846812a2277b3d6c83cd72382ac0849b6a1d65ca84432bda97992868bca066733f110de57c9fffdb92bca77b8736";

/// The package as [`npm::fetch`] takes it.
const PACKAGE_FILE: NpmPackage = NpmPackage {
    name: PACKAGE,
    version: VERSION,
    sha512: SHA512,
    size: "85 MB",
};

/// The shapes of the package's JSON files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileShape {
    /// `[{"title", "author", "paragraphs": [..]}]` (全唐诗, 全宋诗, 宋词).
    Poems,
    /// `{"title", "content": [{"type", "content": [{"chapter", "author", "paragraphs"}]}]}`
    /// (唐诗三百首).
    Anthology,
    /// `[{"title", "chapter", "section", "content": [..]}]` (诗经).
    Songs,
}

/// A subset: which files of the package, and their shape.
struct Subset {
    name: &'static str,
    shape: FileShape,
    matches: fn(&str) -> bool,
}

fn subsets(choice: CorpusChoice) -> Vec<Subset> {
    let tang300 = Subset {
        name: "tang300",
        shape: FileShape::Anthology,
        matches: |p| p == "package/dist/mengxue/tangshisanbaishou.json",
    };
    let tang = Subset {
        name: "tang",
        shape: FileShape::Poems,
        matches: |p| p.starts_with("package/dist/quantangshi/poet.tang.") && p.ends_with(".json"),
    };
    let song = Subset {
        name: "song",
        shape: FileShape::Poems,
        matches: |p| p.starts_with("package/dist/quantangshi/poet.song.") && p.ends_with(".json"),
    };
    let ci = Subset {
        name: "ci",
        shape: FileShape::Poems,
        matches: |p| p.starts_with("package/dist/songci/ci.song.") && p.ends_with(".json"),
    };
    let shijing = Subset {
        name: "shijing",
        shape: FileShape::Songs,
        matches: |p| p == "package/dist/shijing/shijing.json",
    };
    match choice {
        CorpusChoice::Tang300 => vec![tang300],
        CorpusChoice::Tang => vec![tang],
        CorpusChoice::Song => vec![song],
        CorpusChoice::Ci => vec![ci],
        CorpusChoice::Shijing => vec![shijing],
        CorpusChoice::All => vec![tang, song, ci, shijing],
    }
}

/// Loads a subset of the package, fetching and extracting it first if needed.
pub fn load(choice: CorpusChoice, cache_dir: &Path, show_progress: bool) -> Result<Corpus> {
    load_with(choice, cache_dir, show_progress, "npm")
}

/// [`load`] with the `npm` program named (for tests).
pub fn load_with(
    choice: CorpusChoice,
    cache_dir: &Path,
    show_progress: bool,
    npm: &str,
) -> Result<Corpus> {
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let root = cache_dir.join(format!("{PACKAGE}-{VERSION}"));
    let mut documents = Vec::new();
    for subset in subsets(choice) {
        let marker = root.join(format!(".extracted-{}", subset.name));
        if !marker.exists() {
            let tarball = npm::fetch(&PACKAGE_FILE, cache_dir, show_progress, npm)?;
            extract(&tarball, &root, &subset, show_progress)?;
            File::create(&marker).map_err(io(&marker))?;
        }
        let mut files = Vec::new();
        collect_files(&root, &root, &subset, &mut files)?;
        files.sort();
        for file in files {
            documents.extend(parse_file(&file, subset.shape)?);
        }
    }
    Corpus::new(documents, root, 0)
}

/// Extracts the files of `subset` from the tarball into `root` (each file written under a
/// temporary name and renamed).
fn extract(tarball: &Path, root: &Path, subset: &Subset, show_progress: bool) -> Result<()> {
    let file = File::open(tarball).map_err(io(tarball))?;
    let size = file.metadata().map_err(io(tarball))?.len();
    let bar = progress_bytes(show_progress, size, &format!("extracting {}", subset.name));
    let reader = bar.wrap_read(file);
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
    let broken = |e: std::io::Error| TrainError::BrokenArchive {
        path: tarball.to_path_buf(),
        reason: e.to_string(),
    };
    for entry in archive.entries().map_err(broken)? {
        let mut entry = entry.map_err(broken)?;
        let path = entry.path().map_err(broken)?.to_string_lossy().to_string();
        if !(subset.matches)(&path) || path.contains("..") {
            continue;
        }
        let target = root.join(&path);
        let parent = target.parent().expect("an entry has a parent folder");
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        let temporary = target.with_extension("json.partial");
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).map_err(broken)?;
        let mut out = File::create(&temporary).map_err(io(&temporary))?;
        out.write_all(&bytes).map_err(io(&temporary))?;
        std::fs::rename(&temporary, &target).map_err(io(&target))?;
    }
    bar.finish_and_clear();
    Ok(())
}

fn collect_files(
    root: &Path,
    folder: &Path,
    subset: &Subset,
    files: &mut Vec<PathBuf>,
) -> Result<()> {
    for entry in std::fs::read_dir(folder).map_err(io(folder))? {
        let path = entry.map_err(io(folder))?.path();
        if path.is_dir() {
            collect_files(root, &path, subset, files)?;
        } else {
            let relative = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            if (subset.matches)(&relative) {
                files.push(path);
            }
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct Poem {
    #[serde(default)]
    paragraphs: Vec<String>,
}

#[derive(Deserialize)]
struct Song {
    #[serde(default)]
    content: Vec<String>,
}

#[derive(Deserialize)]
struct Anthology {
    content: Vec<AnthologySection>,
}

#[derive(Deserialize)]
struct AnthologySection {
    content: Vec<Poem>,
}

/// Parses one JSON file of the package: one document per poem, its lines joined by `\n`.
/// A document's `line` is its position in the file (from 1).
pub fn parse_file(path: &Path, shape: FileShape) -> Result<Vec<Document>> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let text = super::text::utf8(&bytes, path)?;
    let malformed = |e: serde_json::Error| TrainError::Malformed {
        path: path.to_path_buf(),
        line: e.line(),
        message: format!("not in the {shape:?} shape of chinese-poetry: {e}"),
    };
    let poems: Vec<Vec<String>> = match shape {
        FileShape::Poems => serde_json::from_str::<Vec<Poem>>(text)
            .map_err(malformed)?
            .into_iter()
            .map(|p| p.paragraphs)
            .collect(),
        FileShape::Songs => serde_json::from_str::<Vec<Song>>(text)
            .map_err(malformed)?
            .into_iter()
            .map(|s| s.content)
            .collect(),
        FileShape::Anthology => serde_json::from_str::<Anthology>(text)
            .map_err(malformed)?
            .content
            .into_iter()
            .flat_map(|section| section.content)
            .map(|p| p.paragraphs)
            .collect(),
    };
    Ok(poems
        .into_iter()
        .enumerate()
        .filter_map(|(index, lines)| {
            let text = lines
                .iter()
                .map(|l| l.trim())
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("\n");
            (!text.is_empty()).then_some(Document {
                text,
                line: index + 1,
            })
        })
        .collect())
}
