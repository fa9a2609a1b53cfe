//! A user's own text: a UTF-8 file with documents separated by blank lines, or a JSON-lines
//! file with the text in one field.

use std::path::Path;

use super::{Corpus, Document};
use crate::error::{io, Result, TrainError};

/// Reads `bytes` as UTF-8, or says which line of `path` is not.
pub(crate) fn utf8<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|error| {
        let byte = error.valid_up_to();
        let line = 1 + bytes[..byte].iter().filter(|&&b| b == b'\n').count();
        TrainError::InvalidUtf8 {
            path: path.to_path_buf(),
            line,
            byte,
        }
    })
}

/// Splits text into documents at blank lines (lines holding only white space). Lines inside a
/// document keep their line breaks.
pub fn split_documents(text: &str) -> Vec<Document> {
    let mut documents = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut start = 1;
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                documents.push(Document {
                    text: current.join("\n"),
                    line: start,
                });
                current.clear();
            }
        } else {
            if current.is_empty() {
                start = index + 1;
            }
            current.push(line.trim_end());
        }
    }
    if !current.is_empty() {
        documents.push(Document {
            text: current.join("\n"),
            line: start,
        });
    }
    documents
}

/// A UTF-8 text file, documents separated by blank lines.
pub fn read_text_file(path: &Path) -> Result<Corpus> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let text = utf8(&bytes, path)?;
    let lines = text.lines().count();
    Corpus::new(split_documents(text), path.to_path_buf(), lines)
}

/// A JSON-lines file: each non-empty line is an object whose string field `field` is one
/// document.
pub fn read_jsonl_file(path: &Path, field: &str) -> Result<Corpus> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let text = utf8(&bytes, path)?;
    let mut documents = Vec::new();
    let mut lines = 0;
    for (index, line) in text.lines().enumerate() {
        lines += 1;
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |message: String| TrainError::Malformed {
            path: path.to_path_buf(),
            line: index + 1,
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
        let text = value
            .get(field)
            .ok_or_else(|| malformed(format!("no field `{field}` in this object")))?
            .as_str()
            .ok_or_else(|| malformed(format!("field `{field}` is not a string")))?;
        if !text.trim().is_empty() {
            documents.push(Document {
                text: text.trim().to_string(),
                line: index + 1,
            });
        }
    }
    Corpus::new(documents, path.to_path_buf(), lines)
}
