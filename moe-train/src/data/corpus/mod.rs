//! Corpora: the `chinese-poetry` package, a user's text file or JSON-lines file.
//!
//! Every source produces [`Document`]s (one poem, one paragraph block, one JSON line), each
//! remembering where it came from so that errors can name the file and line.

pub mod npm;
pub mod poetry;
pub mod text;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::DataConfig;
use crate::error::{Result, TrainError};

/// One training document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Its text.
    pub text: String,
    /// Line (from 1) of the source file where it starts.
    pub line: usize,
}

/// The documents of a corpus and where they came from.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The documents, in source order.
    pub documents: Vec<Document>,
    /// The file or folder they were read from.
    pub source: PathBuf,
    /// Lines in the source (for error messages).
    pub lines: usize,
}

impl Corpus {
    /// The corpus of `documents` read from `source`, or [`TrainError::EmptyCorpus`] if there
    /// are none.
    pub fn new(documents: Vec<Document>, source: PathBuf, lines: usize) -> Result<Self> {
        if documents.is_empty() {
            return Err(TrainError::EmptyCorpus {
                path: source,
                lines,
            });
        }
        Ok(Self {
            documents,
            source,
            lines,
        })
    }
}

impl Corpus {
    /// SHA-256 of the documents' texts in order (each followed by a 0 byte): it changes when
    /// any document does, and not when only what separates documents in the file changes.
    pub fn checksum(&self) -> String {
        let mut hasher = Sha256::new();
        for document in &self.documents {
            hasher.update(document.text.as_bytes());
            hasher.update([0u8]);
        }
        crate::checksum::hex(&hasher.finalize())
    }
}

/// Loads the corpus `data` asks for: `--text`, `--jsonl`, or the default poetry corpus
/// (fetched into `cache_dir` on first use).
pub fn load(data: &DataConfig, cache_dir: &Path, show_progress: bool) -> Result<Corpus> {
    if let Some(path) = &data.text {
        return text::read_text_file(path);
    }
    if let (Some(path), Some(field)) = (&data.jsonl, &data.field) {
        return text::read_jsonl_file(path, field);
    }
    poetry::load(data.corpus, cache_dir, show_progress)
}
