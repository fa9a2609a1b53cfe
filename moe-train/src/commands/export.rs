//! `burn-moe export`: a checkpoint's text model as a folder other programs read.
//!
//! When the model's options fit one of the Hugging Face MoE architectures
//! ([`moe_models::hf::fitting_architecture`]), the folder is that architecture's:
//! `config.json` and `model.safetensors` under its tensor names, which transformers loads.
//! Otherwise it is ours, documented here:
//!
//! - `config.json`: the [`moe_models::MoeTransformerConfig`] (Burn's config JSON);
//! - `model.safetensors` (f32), one tensor per parameter, named by its module path, with
//!   linear weights stored `[in, out]` (Burn's layout), e.g. `token_embedding.weight`
//!   `[vocab, d]`, `stack.blocks.{i}.attention.{query,key,value,output}.{weight,bias}`,
//!   `stack.blocks.{i}.{attention_norm,ffn_norm}.{rms.gamma | layer.gamma, layer.beta}`,
//!   `stack.blocks.{i}.ffn.moe.router.weight` `[d, E]`,
//!   `stack.blocks.{i}.ffn.moe.experts.{w_in,w_gate}` `[E, d, h]`, `.w_out` `[E, h, d]`,
//!   `.b_in` `[E, h]`, `.b_out` `[E, d]`, `stack.blocks.{i}.ffn.dense.*` (one expert),
//!   `stack.final_norm.*`, and `lm_head.weight` `[d, vocab]` when it is not tied;
//! - the tokenizer as the checkpoint holds it (`tokenizer.json`, burn-moe's format).
//!
//! A Hugging Face folder's `tokenizer.json` is in the `tokenizers` format transformers reads
//! ([`crate::data::tokenizer::Tokenizer::hf_json`]): a run fine-tuned from a Hugging Face
//! model (`train --init-hf`) exports to its own architecture with its own tokenizer, a run
//! trained here with its character or BPE vocabulary in that format, and the tokenizer's
//! special ids go into `config.json`. A LoRA run's adapters are merged into the weights,
//! `W = W_0 + (alpha / r) A B`.

use burn::module::Module;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use moe_models::hf::{self, HfArchitecture};

use crate::cli::ExportArgs;
use crate::commands::load_finite;
use crate::config::TaskKind;
use crate::data::tasks::text::text_model;
use crate::data::tokenizer::Tokenizer;
use crate::error::{io, Result, TrainError};
use crate::runtime::backend::{self, Precision};
use crate::store::checkpoint;

/// The layout `export` wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportLayout {
    /// A Hugging Face folder of this architecture.
    HuggingFace(HfArchitecture),
    /// burn-moe's own names (see the module documentation).
    BurnMoe,
    /// A LoRA run's adapters alone, as a PEFT folder for a base of this architecture
    /// (`export --adapters`).
    Peft(HfArchitecture),
}

/// Writes the checkpoint's model into `args.out`, which must be empty or absent; returns the
/// layout used.
pub fn export(args: &ExportArgs) -> Result<ExportLayout> {
    let out = &args.out;
    if out.exists() && !out.is_dir() {
        return Err(TrainError::Argument(format!(
            "{} is a file, not a folder; export writes a model folder (config.json, safetensors, tokenizer.json): name a new or empty folder with `--out`",
            out.display()
        )));
    }
    if out.exists() && std::fs::read_dir(out).map_err(io(out))?.next().is_some() {
        return Err(TrainError::Argument(format!(
            "{} is not empty; export writes into an empty or new folder so that nothing is overwritten",
            out.display()
        )));
    }
    let verify = crate::cli::verify_flag(args.no_verify);
    let opened = checkpoint::open(&args.checkpoint, verify)?;
    if opened.config.task != TaskKind::Text {
        return Err(TrainError::Argument(
            "export writes text models; this checkpoint is of a digits task".into(),
        ));
    }
    let tokenizer_path = opened.folder.join(checkpoint::TOKENIZER_FILE);
    let tokenizer = Tokenizer::load(&tokenizer_path)?;
    let config = opened.config.text_model_config(tokenizer.vocab_size());
    // The Hugging Face architecture to write, `None` for burn-moe's own names.
    let layout: Option<HfArchitecture> = match args.arch {
        Some(arch) => {
            hf::to_hf_config(&config, arch.into())?;
            Some(arch.into())
        }
        None => hf::fitting_architecture(&config),
    };
    let device = backend::select_and_report(args.backend, Precision::F32)?.device;
    let model = text_model(&opened.config, tokenizer.vocab_size(), &device, false)?;
    if args.adapters {
        return export_adapters(&opened, load_finite(&opened.folder, model)?, out);
    }
    // A LoRA run's adapters merge into the weights they adapt.
    let model = load_finite(&opened.folder, model)?.materialize();
    std::fs::create_dir_all(out).map_err(io(out))?;
    match layout {
        Some(arch) => {
            // The tokenizer's special ids go into the config, where transformers' generation
            // and `generate --hf` read them.
            let specials = tokenizer.specials();
            let base = Some(serde_json::json!({
                "bos_token_id": specials.bos,
                "eos_token_id": specials.eos,
                "pad_token_id": specials.pad,
            }));
            // The source folder's precision unless `--weights` says otherwise.
            let source = opened.config.variant.hf.as_ref();
            let named = source.and_then(|hf| hf.torch_dtype.as_ref());
            let format = match (args.weights, named) {
                (Some(weights), _) => weights.into(),
                (None, Some(name)) => hf::WeightFormat::named(name),
                (None, None) => hf::WeightFormat::F32,
            };
            hf::save_as(&model, arch, out, base.as_ref(), format)?
        }
        None => {
            let config_path = out.join("config.json");
            let json = burn::config::config_to_json(model.config());
            std::fs::write(&config_path, json).map_err(io(&config_path))?;
            let weights = out.join("model.safetensors");
            model
                .save_into(&mut SafetensorsStore::from_file(&weights))
                .map_err(|e| TrainError::Argument(format!("{}: {e}", weights.display())))?;
        }
    }
    let tokenizer_path = out.join("tokenizer.json");
    match layout {
        // In the `tokenizers` format, which transformers and `generate --hf` read.
        Some(_) => {
            let json = tokenizer.hf_json()?;
            std::fs::write(&tokenizer_path, json).map_err(io(&tokenizer_path))?
        }
        None => tokenizer.save(&tokenizer_path)?,
    }
    Ok(layout.map_or(ExportLayout::BurnMoe, ExportLayout::HuggingFace))
}

/// `export --adapters`: a LoRA run's adapters as a PEFT folder for the Hugging Face model the
/// run started from ([`hf::peft::save_adapters`]).
fn export_adapters(
    opened: &checkpoint::Opened,
    model: moe_models::MoeTransformer,
    out: &std::path::Path,
) -> Result<ExportLayout> {
    let variant = &opened.config.variant;
    let (Some(base), Some(_)) = (&variant.hf, &variant.lora) else {
        return Err(TrainError::Argument(
            "`--adapters` writes a LoRA run's adapters; this run trained every weight (export it without `--adapters`)".into(),
        ));
    };
    let arch = hf::HfArchitecture::from_model_type(&base.model_type)?;
    hf::peft::save_adapters(&model, arch, out, &base.dir.display().to_string())?;
    Ok(ExportLayout::Peft(arch))
}

/// `burn-moe export`: writes the folder and says which layout it used.
pub fn run(args: &ExportArgs) -> Result<()> {
    let layout = export(args)?;
    let what = match layout {
        ExportLayout::HuggingFace(arch) => {
            format!("a Hugging Face {} folder", arch.class_name())
        }
        ExportLayout::BurnMoe => {
            "burn-moe's own names (the model fits no Hugging Face architecture)".into()
        }
        ExportLayout::Peft(arch) => format!(
            "a PEFT adapter folder for the {} it was trained on",
            arch.class_name()
        ),
    };
    println!("wrote {} as {what}", args.out.display());
    Ok(())
}
