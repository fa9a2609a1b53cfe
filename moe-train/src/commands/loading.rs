//! What `generate`, `eval` and `export` share: the model a checkpoint holds, refused when it
//! is not finite, and held in the format `--weights` names.

use moe_models::storage::{Storage, StorageOptions};
use moe_models::MoeTransformer;

use crate::error::{Result, TrainError};
use crate::store::checkpoint;
use crate::training::divergence::non_finite_parameters;

/// The error for a command given neither `--checkpoint` nor `--hf` (clap normally refuses it
/// first).
pub(crate) fn no_model() -> TrainError {
    TrainError::Argument("give `--checkpoint DIR` or `--hf DIR`".into())
}

/// `model` with its weights held in `weights` (`--weights`; see [`moe_models::storage`]),
/// refused where `device` cannot hold them.
pub(crate) fn held(
    model: MoeTransformer,
    weights: Storage,
    device: &burn::tensor::Device,
) -> Result<MoeTransformer> {
    let options = StorageOptions::new(weights).on(device);
    options.check_device(device).map_err(TrainError::Argument)?;
    Ok(moe_models::storage::hold(model, &options))
}

/// Refuses `--weights` other than f32 for the digits models, which stay f32.
pub(crate) fn refuse_held_digits(weights: crate::cli::HeldWeights) -> Result<()> {
    if weights == crate::cli::HeldWeights::F32 {
        return Ok(());
    }
    Err(TrainError::Argument(
        "`--weights` holds a text model's weights; the digits models stay f32".into(),
    ))
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
