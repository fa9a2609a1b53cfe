//! The command line of `burn-moe`: the subcommands and their flags. `train`'s flags, and how
//! they write into the config, are in `train.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::error::{Result, TrainError};
use crate::runtime::backend::BackendChoice;
use crate::store::checkpoint;

mod train;

pub use train::{flag_for, LoraTargetChoice, TrainArgs};

/// burn-moe: train Mixture-of-Experts models on a laptop GPU or the CPU.
#[derive(Debug, Parser)]
#[command(name = "burn-moe", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model (by default: the tiny preset on 全唐诗).
    Train(Box<TrainArgs>),
    /// Generate text (or digit images) from a checkpoint, streaming it as it is produced.
    Generate(GenerateArgs),
    /// Validation loss, perplexity and expert load of a checkpoint.
    Eval(EvalArgs),
    /// Write a checkpoint's text model as a Hugging Face folder (when its options fit Mixtral,
    /// Qwen2-MoE or OLMoE) or under burn-moe's own documented names.
    Export(ExportArgs),
    /// Train the MoE config and its dense twin (equal work per token) with the same seed and
    /// data order, and plot both validation curves against steps and time.
    Compare(Box<TrainArgs>),
    /// Serve this machine's device to other machines' `burn-moe train --devices
    /// ws://HOST:PORT,...` (a Burn remote server over WebSocket); runs until Ctrl-C.
    Serve(ServeArgs),
}

impl Command {
    /// The backend the command will run on, as far as its flags (or, for `train --resume`
    /// without `--backend`, the saved run's config) say; `None` when not known before the
    /// device is chosen.
    pub fn backend_hint(&self) -> Option<BackendChoice> {
        match self {
            Command::Train(args) => args.backend.or_else(|| {
                let resume = args
                    .resume
                    .then(|| checkpoint::read_config(&args.out_dir()));
                resume?.ok().map(|config| config.run.backend)
            }),
            Command::Compare(args) => args.backend,
            Command::Generate(args) => Some(args.backend),
            Command::Eval(args) => Some(args.backend),
            Command::Export(args) => Some(args.backend),
            Command::Serve(args) => Some(args.backend),
        }
    }
}

/// `burn-moe serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The port to listen on (0: one the system picks, printed on the first line).
    #[arg(long, default_value_t = 7070)]
    pub port: u16,
    /// The address to listen on: `0.0.0.0` for every network, `127.0.0.1` for this machine
    /// only.
    #[arg(long, default_value = "0.0.0.0")]
    pub host: String,
    /// The device served.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Serve only clients that give this token (`train --token`); default: the
    /// `BURN_MOE_TOKEN` environment variable. Without one, anyone who reaches the port can run
    /// tensor operations here.
    #[arg(long)]
    pub token: Option<String>,
}

/// The token given with `--token`, or else the `BURN_MOE_TOKEN` environment variable.
pub fn token_or_env(token: &Option<String>) -> Option<String> {
    token
        .clone()
        .or_else(|| std::env::var("BURN_MOE_TOKEN").ok())
        .filter(|token| !token.is_empty())
}

/// What `--no-verify` asks of [`checkpoint::open`]; warns on stderr when it skips the check.
pub fn verify_flag(no_verify: bool) -> checkpoint::Verify {
    if !no_verify {
        return checkpoint::Verify::Checked;
    }
    eprintln!(
        "warning: --no-verify: the checkpoint's files are not checked against their checksums; a damaged or swapped file shows only where a reader notices it"
    );
    checkpoint::Verify::Skipped
}

/// `burn-moe generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A run folder (its latest checkpoint) or a checkpoint folder.
    #[arg(long, required_unless_present = "hf", conflicts_with = "hf")]
    pub checkpoint: Option<PathBuf>,
    /// A Hugging Face model folder (Mixtral, Qwen2-MoE or OLMoE: `config.json`, safetensors,
    /// `tokenizer.json`) instead of a checkpoint.
    #[arg(long)]
    pub hf: Option<PathBuf>,
    /// Text to continue (a numeral such as 七 for the digits tasks).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sample among the most likely tokens that make up this much probability (1: all).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Load a `--checkpoint` whose files cannot be checked against recorded checksums (one
    /// written by an older burn-moe, or whose manifest was deleted), without checking them.
    #[arg(long, conflicts_with = "hf")]
    pub no_verify: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Keep every MoE layer's experts in CPU memory, the rest of the model on the GPU (text
    /// models).
    #[arg(long)]
    pub offload_experts: bool,
    /// How the model (a text checkpoint or `--hf` folder) holds its attention, expert and
    /// feed-forward weights: f32, bf16, or quantized to 8 or 4 bits with a scale per 64
    /// values (norms and routers stay f32; embeddings bf16 below f32).
    #[arg(long, value_enum, default_value_t = HeldWeights::F32)]
    pub weights: HeldWeights,
}

/// The formats `--weights` holds a Hugging Face model's weights in (`moe_models::hf::Storage`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HeldWeights {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16 (how most checkpoints ship).
    Bf16,
    /// 8-bit integers, a scale per block of 64.
    Q8,
    /// 4-bit integers, a scale per block of 64.
    Q4,
}

impl HeldWeights {
    /// Whether this is f32 (what a config leaves out).
    pub fn is_f32(&self) -> bool {
        *self == HeldWeights::F32
    }
}

impl From<HeldWeights> for moe_models::hf::Storage {
    fn from(weights: HeldWeights) -> Self {
        match weights {
            HeldWeights::F32 => Self::F32,
            HeldWeights::Bf16 => Self::Bf16,
            HeldWeights::Q8 => Self::Q8,
            HeldWeights::Q4 => Self::Q4,
        }
    }
}

impl GenerateArgs {
    /// Greedy generation of at most `max_tokens` after `prompt` from `checkpoint` (a run or
    /// checkpoint folder), the other settings at their defaults.
    pub fn greedy(
        checkpoint: PathBuf,
        prompt: &str,
        max_tokens: usize,
        backend: BackendChoice,
    ) -> Self {
        Self {
            checkpoint: Some(checkpoint),
            hf: None,
            prompt: prompt.into(),
            max_tokens,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            no_verify: false,
            backend,
            offload_experts: false,
            weights: HeldWeights::F32,
        }
    }

    /// Checks the sampling settings.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && (0.0..=100.0).contains(&self.temperature)) {
            return Err(TrainError::Argument(format!(
                "`--temperature` must be in [0, 100] (0: greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(TrainError::Argument(format!(
                "`--top-p` must be in (0, 1] (1: no cut), got {}",
                self.top_p
            )));
        }
        if self.max_tokens == 0 || self.max_tokens > 1 << 16 {
            return Err(TrainError::Argument(format!(
                "`--max-tokens` must be in [1, 65536], got {}",
                self.max_tokens
            )));
        }
        Ok(())
    }
}

impl EvalArgs {
    /// Evaluation of `checkpoint` (a run or checkpoint folder) on its run's validation data,
    /// the other settings at their defaults.
    pub fn checkpoint(checkpoint: PathBuf, backend: BackendChoice) -> Self {
        Self {
            checkpoint: Some(checkpoint),
            hf: None,
            text: None,
            window: None,
            batches: None,
            form: false,
            form_samples: 100,
            no_verify: false,
            backend,
            weights: HeldWeights::F32,
        }
    }
}

/// `burn-moe eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run folder (its latest checkpoint) or a checkpoint folder.
    #[arg(long, required_unless_present = "hf", conflicts_with = "hf")]
    pub checkpoint: Option<PathBuf>,
    /// A Hugging Face model folder (Mixtral, Qwen2-MoE or OLMoE) instead of a checkpoint: its
    /// perplexity on `--text`.
    #[arg(long, requires = "text")]
    pub hf: Option<PathBuf>,
    /// The text file `--hf` is evaluated on.
    #[arg(long, requires = "hf")]
    pub text: Option<PathBuf>,
    /// Tokens per evaluation window with `--hf` (default: the model's context, at most 1,024).
    #[arg(long, requires = "hf")]
    pub window: Option<usize>,
    /// Validation batches (default: the run's `eval_batches`).
    #[arg(long)]
    pub batches: Option<usize>,
    /// Also sample poems from the first lines (5 and 7 characters) of validation poems and
    /// report the share of generated lines that keep the prompt's length (text runs).
    #[arg(long)]
    pub form: bool,
    /// Samples per line length for `--form`.
    #[arg(long, default_value_t = 100)]
    pub form_samples: usize,
    /// Load a `--checkpoint` whose files cannot be checked against recorded checksums (one
    /// written by an older burn-moe, or whose manifest was deleted), without checking them.
    #[arg(long, conflicts_with = "hf")]
    pub no_verify: bool,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// How the model (a text checkpoint or `--hf` folder) holds its attention, expert and
    /// feed-forward weights while it is evaluated (see `generate --weights`): what a format
    /// costs in loss.
    #[arg(long, value_enum, default_value_t = HeldWeights::F32)]
    pub weights: HeldWeights,
}

/// `burn-moe export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A run folder (its latest checkpoint) or a checkpoint folder, of a text run.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The folder to write (empty or new).
    #[arg(long)]
    pub out: PathBuf,
    /// The Hugging Face layout to write (default: the first whose options the model fits;
    /// burn-moe's own names when none does).
    #[arg(long, value_enum)]
    pub arch: Option<HfArch>,
    /// Load a checkpoint whose files cannot be checked against recorded checksums (one
    /// written by an older burn-moe, or whose manifest was deleted), without checking them.
    #[arg(long)]
    pub no_verify: bool,
    /// Where to load the model.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// The precision of a Hugging Face folder's weights (default: the precision of the folder
    /// the run started from, f32 for a run trained from scratch).
    #[arg(long, value_enum)]
    pub weights: Option<ExportWeights>,
    /// Write a LoRA run's adapters alone, as a PEFT folder (`adapter_config.json`,
    /// `adapter_model.safetensors`) for the base it was trained on, instead of the merged model
    /// (adapters on the attention projections only).
    #[arg(long, conflicts_with_all = ["arch", "weights"])]
    pub adapters: bool,
}

/// The precisions `export --weights` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportWeights {
    /// 32-bit floats.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl From<ExportWeights> for moe_models::hf::WeightFormat {
    fn from(weights: ExportWeights) -> Self {
        match weights {
            ExportWeights::F32 => Self::F32,
            ExportWeights::Bf16 => Self::Bf16,
            ExportWeights::F16 => Self::F16,
        }
    }
}

/// A Hugging Face MoE architecture, as `--arch` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HfArch {
    /// `MixtralForCausalLM`.
    Mixtral,
    /// `Qwen2MoeForCausalLM`.
    Qwen2Moe,
    /// `OlmoeForCausalLM`.
    Olmoe,
}

impl From<HfArch> for moe_models::hf::HfArchitecture {
    fn from(arch: HfArch) -> Self {
        match arch {
            HfArch::Mixtral => Self::Mixtral,
            HfArch::Qwen2Moe => Self::Qwen2Moe,
            HfArch::Olmoe => Self::Olmoe,
        }
    }
}
