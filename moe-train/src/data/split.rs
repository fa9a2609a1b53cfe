//! The deterministic train/validation split, by document.

use moe_core::rng::SplitMix64;

use crate::data::corpus::Document;

/// Keeps the split's random stream apart from the other uses of the run seed.
const SPLIT_STREAM: u64 = 0x5eed_0000_0000_0001;

/// Documents for training and for validation.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training documents, in source order.
    pub train: Vec<Document>,
    /// Validation documents, in source order.
    pub validation: Vec<Document>,
    /// Indices (in source order) of the validation documents, as a checkpoint records them.
    pub validation_indices: Vec<usize>,
}

/// Holds out `ceil(fraction * n)` documents (at least one when there are two or more and
/// `fraction > 0`) chosen by a shuffle seeded with `seed`; the same documents and seed always
/// give the same split.
pub fn split(documents: Vec<Document>, fraction: f64, seed: u64) -> Split {
    let count = documents.len();
    let mut held_out = ((count as f64) * fraction).ceil() as usize;
    if fraction > 0.0 && count >= 2 {
        held_out = held_out.clamp(1, count - 1);
    } else {
        held_out = 0;
    }
    let mut order: Vec<usize> = (0..count).collect();
    SplitMix64(seed ^ SPLIT_STREAM).shuffle(&mut order);
    let mut held: Vec<usize> = order[..held_out].to_vec();
    held.sort_unstable();
    split_at(documents, &held)
}

/// The split that holds out the documents at `validation_indices` (sorted, in range: a
/// checkpoint's record of the split, checked against the corpus's checksum first).
pub fn split_at(documents: Vec<Document>, validation_indices: &[usize]) -> Split {
    let mut is_validation = vec![false; documents.len()];
    for &index in validation_indices {
        if let Some(slot) = is_validation.get_mut(index) {
            *slot = true;
        }
    }
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    for (document, validation_doc) in documents.into_iter().zip(is_validation) {
        if validation_doc {
            validation.push(document);
        } else {
            train.push(document);
        }
    }
    Split {
        train,
        validation,
        validation_indices: validation_indices.to_vec(),
    }
}
