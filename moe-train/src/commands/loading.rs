//! What `generate`, `eval` and `export` share: the model a checkpoint holds, refused when it
//! is not finite.

use crate::error::{Result, TrainError};
use crate::store::checkpoint;
use crate::training::divergence::non_finite_parameters;

/// The error for a command given neither `--checkpoint` nor `--hf` (clap normally refuses it
/// first).
pub(crate) fn no_model() -> TrainError {
    TrainError::Argument("give `--checkpoint DIR` or `--hf DIR`".into())
}

/// Loads a checkpoint's model and refuses it if any weight is NaN or infinite: such a model
/// gives NaN losses and samples garbage (the pad token), and its checkpoint is not worth using.
pub fn load_finite<M: burn::module::Module>(folder: &std::path::Path, model: M) -> Result<M> {
    let model = checkpoint::load_model(folder, model)?;
    let bad = non_finite_parameters(&model);
    if bad.is_empty() {
        return Ok(model);
    }
    let values: usize = bad.iter().map(|(_, count)| count).sum();
    let names: Vec<&str> = bad.iter().take(3).map(|(path, _)| path.as_str()).collect();
    Err(TrainError::NonFiniteModel {
        path: folder.to_path_buf(),
        detail: format!(
            "{values} values in {} parameter tensors, among them {}",
            bad.len(),
            names.join(", ")
        ),
        alternatives: checkpoint::alternatives_of(folder),
    })
}
