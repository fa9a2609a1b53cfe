//! The command line of `burn-moe`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use moe_core::lora::{LoraConfig, LoraTarget};

use crate::config::{
    CorpusChoice, DigitSource, GateChoice, Preset, TaskKind, TokenizerKind, TrainConfig,
};
use crate::error::{Result, TrainError};
use crate::runtime::backend::{BackendChoice, Precision};
use crate::store::checkpoint;
use crate::training::divergence::OnNonFinite;
use crate::training::parallel::Parallelism;

/// The weights `--lora-targets` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraTargetChoice {
    /// The attention projections (query, key, value, output).
    Attention,
    /// The routers (and Qwen2-MoE's shared-expert gate).
    Router,
    /// The experts' weights (routed and shared, and the dense layers' feed-forward weights).
    Experts,
}

impl From<LoraTargetChoice> for LoraTarget {
    fn from(choice: LoraTargetChoice) -> Self {
        match choice {
            LoraTargetChoice::Attention => LoraTarget::Attention,
            LoraTargetChoice::Router => LoraTarget::Router,
            LoraTargetChoice::Experts => LoraTarget::Experts,
        }
    }
}

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

/// `burn-moe train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Starting point of the config (default: tiny).
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// A TOML or JSON file with config fields to change (any subset of the sections `task`,
    /// `data`, `model`, `optim`, `run`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The run folder: checkpoints, metrics, plots and the resolved config (default
    /// `runs/<preset>` or `runs/<preset>-<task>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in `--out` from its latest checkpoint.
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// With `--resume`: continue from a checkpoint whose files cannot be checked against
    /// recorded checksums (one written by an older burn-moe, or whose manifest was deleted),
    /// without checking them.
    #[arg(long, requires = "resume")]
    pub no_verify: bool,
    /// Fine-tune a Hugging Face MoE model (Mixtral, Qwen2-MoE or OLMoE folder: `config.json`,
    /// safetensors, `tokenizer.json`) on the corpus instead of training the preset's model
    /// from scratch; its tokenizer replaces the corpus-built one.
    #[arg(long, conflicts_with = "resume")]
    pub init_hf: Option<PathBuf>,
    /// Fine-tune the `--init-hf` model with LoRA adapters of this rank instead of every
    /// weight: its weights stay frozen, checkpoints hold the adapters alone, and `export`
    /// merges them into the weights.
    #[arg(long, requires = "init_hf")]
    pub lora_rank: Option<usize>,
    /// LoRA's alpha: the adapters' updates are scaled by `alpha / rank` (default: `2 * rank`).
    #[arg(long, requires = "lora_rank")]
    pub lora_alpha: Option<f64>,
    /// The weights that get LoRA adapters, comma-separated (default: attention).
    #[arg(long, value_enum, value_delimiter = ',', requires = "lora_rank")]
    pub lora_targets: Vec<LoraTargetChoice>,
    /// Start a new run in an `--out` that holds one, deleting its checkpoints, metrics and
    /// plots.
    #[arg(long)]
    pub overwrite: bool,
    /// What to do at a step whose loss or gradient norm is NaN or infinite (default: stop).
    #[arg(long, value_enum)]
    pub on_nonfinite: Option<OnNonFinite>,
    /// Optimizer steps (total, counting the steps already done when resuming).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Steps of linear learning-rate warm-up (default: the preset's; a preset's warm-up
    /// longer than the run is cut to a tenth of `--steps`).
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Stop after this step, saving a checkpoint, as if interrupted (continue later with
    /// `--resume`; the schedule still spans `--steps`).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Where to run.
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
    /// Train on several devices, comma-separated, the first holding the model: `local` (the
    /// `--backend` device), `flex`, `ndarray`, `wgpu`, or a `burn-moe serve` server as
    /// `ws://host:port`. How they are used: `--parallel`. Resuming may give other devices.
    #[arg(long, value_delimiter = ',')]
    pub devices: Option<Vec<String>>,
    /// How several `--devices` are used: experts spread over them and each micro-batch split
    /// over them (`both`, the default), or only one of the two.
    #[arg(long, value_enum)]
    pub parallel: Option<Parallelism>,
    /// The token the `ws://` servers were started with (default: the `BURN_MOE_TOKEN`
    /// environment variable). Never saved.
    #[arg(long)]
    pub token: Option<String>,
    /// Float precision.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// What to train.
    #[arg(long, value_enum)]
    pub task: Option<TaskKind>,
    /// Where the digits tasks' images come from.
    #[arg(long, value_enum)]
    pub digits: Option<DigitSource>,
    /// Part of the chinese-poetry corpus.
    #[arg(long, value_enum, conflicts_with_all = ["text", "jsonl"])]
    pub corpus: Option<CorpusChoice>,
    /// Train on your own UTF-8 text file (documents separated by blank lines).
    #[arg(long, conflicts_with = "jsonl")]
    pub text: Option<PathBuf>,
    /// Train on a JSON-lines file (one document per line, in `--field`).
    #[arg(long, requires = "field")]
    pub jsonl: Option<PathBuf>,
    /// The JSON field holding the text.
    #[arg(long, requires = "jsonl", conflicts_with = "text")]
    pub field: Option<String>,
    /// Where the corpus is cached (default `~/.cache/burn-moe`).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Tokenizer.
    #[arg(long, value_enum)]
    pub tokenizer: Option<TokenizerKind>,
    /// Rarer characters become `<unk>`.
    #[arg(long)]
    pub min_freq: Option<usize>,
    /// Train the dense model with the same active parameters instead.
    #[arg(long)]
    pub dense: bool,
    /// The MoE gate.
    #[arg(long, value_enum)]
    pub gate: Option<GateChoice>,
    /// Experts per MoE layer.
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts per token.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Context length.
    #[arg(long)]
    pub context: Option<usize>,
    /// Weight of the balancing loss.
    #[arg(long)]
    pub aux_loss_weight: Option<f64>,
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long)]
    pub grad_clip: Option<f64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Evaluate every N steps.
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Save a checkpoint every N steps.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Checkpoints to keep.
    #[arg(long)]
    pub keep: Option<usize>,
    /// Samples to print at the end.
    #[arg(long)]
    pub samples: Option<usize>,
}

impl TrainArgs {
    /// The run folder.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let preset = self.preset.unwrap_or(Preset::Tiny);
            let preset = serde_json::to_value(preset).expect("serialises");
            let preset = preset.as_str().unwrap_or("run").to_string();
            match self.task {
                Some(task) if task != TaskKind::Text => {
                    let task = serde_json::to_value(task).expect("serialises");
                    PathBuf::from("runs")
                        .join(format!("{preset}-{}", task.as_str().unwrap_or("task")))
                }
                _ => PathBuf::from("runs").join(preset),
            }
        })
    }

    /// The config of the run: the preset, the config file, then the flags. When resuming, the
    /// saved config with the flags on top (the trainer refuses changes beyond the `run`
    /// section).
    pub fn resolve(&self) -> Result<TrainConfig> {
        if self.resume && self.config.is_some() {
            return Err(TrainError::Config(
                "`--resume` continues the saved config; `--config` cannot be combined with it"
                    .into(),
            ));
        }
        if let (true, Some(preset)) = (self.resume, self.preset) {
            return Err(TrainError::Config(format!(
                "`--resume` continues the saved config; `--preset {}` would have no effect (leave it out)",
                preset.name()
            )));
        }
        let mut config = if self.resume {
            let out = self.out_dir();
            crate::store::run_dir::check_is_folder(&out)?;
            checkpoint::read_config(&out)?
        } else {
            let preset = self.preset.unwrap_or(Preset::Tiny);
            TrainConfig::from_preset_and_file(preset, self.config.as_deref())?
        };
        let set = |slot: &mut usize, value: Option<usize>| {
            if let Some(value) = value {
                *slot = value;
            }
        };
        set(&mut config.run.steps, self.steps);
        set(&mut config.optim.warmup_steps, self.warmup);
        if !self.resume && self.warmup.is_none() && config.optim.warmup_steps > config.run.steps {
            let shortened = config.run.steps / 10;
            eprintln!(
                "note: the warm-up of {} steps is longer than the run's {}; it is cut to {shortened} (set it with `--warmup`)",
                config.optim.warmup_steps, config.run.steps
            );
            config.optim.warmup_steps = shortened;
        }
        if !self.resume {
            // A resumed run keeps its tokenizer, so `--min-freq` only warns (`warnings`).
            set(&mut config.data.min_freq, self.min_freq);
        }
        set(&mut config.model.experts, self.experts);
        set(&mut config.model.top_k, self.top_k);
        set(&mut config.model.context_length, self.context);
        set(&mut config.optim.batch_size, self.batch_size);
        set(&mut config.optim.grad_accum, self.grad_accum);
        set(&mut config.run.eval_every, self.eval_every);
        set(&mut config.run.checkpoint_every, self.checkpoint_every);
        set(&mut config.run.keep_checkpoints, self.keep);
        set(&mut config.run.samples, self.samples);
        if let Some(backend) = self.backend {
            config.run.backend = backend;
        }
        if let Some(devices) = &self.devices {
            config.run.devices = devices.clone();
        }
        if let Some(parallel) = self.parallel {
            config.run.parallel = parallel;
        }
        if let Some(precision) = self.precision {
            config.run.precision = precision;
        }
        if let Some(task) = self.task {
            config.task = task;
        }
        if let Some(corpus) = self.corpus {
            config.data.corpus = corpus;
        }
        if let Some(digits) = self.digits {
            config.data.digits = digits;
        }
        if self.text.is_some() {
            config.data.text = self.text.clone();
        }
        if self.jsonl.is_some() {
            config.data.jsonl = self.jsonl.clone();
            config.data.field = self.field.clone();
        }
        if self.cache_dir.is_some() {
            config.data.cache_dir = self.cache_dir.clone();
        }
        if let Some(tokenizer) = self.tokenizer {
            config.data.tokenizer = tokenizer;
        }
        if self.dense {
            config.model.dense = true;
        }
        if let Some(dir) = &self.init_hf {
            config.model.hf = Some(crate::config::HfInit::read(dir)?);
        }
        if let Some(rank) = self.lora_rank {
            let mut targets: Vec<LoraTarget> = Vec::new();
            for choice in &self.lora_targets {
                let target = LoraTarget::from(*choice);
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
            if targets.is_empty() {
                targets.push(LoraTarget::Attention);
            }
            config.model.lora = Some(
                LoraConfig::new(rank)
                    .with_alpha(self.lora_alpha)
                    .with_targets(targets),
            );
        }
        if let Some(gate) = self.gate {
            config.model.gate = gate;
            match gate {
                GateChoice::Switch => config.model.top_k = self.top_k.unwrap_or(1),
                GateChoice::Gshard => config.model.top_k = self.top_k.unwrap_or(2),
                _ => {}
            }
        }
        if let Some(weight) = self.aux_loss_weight {
            config.model.aux_loss_weight = weight;
        }
        if let Some(lr) = self.lr {
            // The preset's ratio of final to peak learning rate is kept.
            let ratio = config.optim.min_lr / config.optim.lr;
            config.optim.lr = lr;
            if lr.is_finite() && ratio.is_finite() {
                config.optim.min_lr = lr * ratio;
            }
        }
        if let Some(clip) = self.grad_clip {
            config.optim.grad_clip = clip;
        }
        if let Some(mode) = self.on_nonfinite {
            config.run.on_nonfinite = mode;
        }
        if let Some(seed) = self.seed {
            config.run.seed = seed;
        }
        Ok(config)
    }
}

impl TrainArgs {
    /// The folder `compare` writes its two runs and its plot into (default
    /// `runs/<preset>-compare`).
    pub fn compare_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let preset = self.preset.unwrap_or(Preset::Tiny);
            PathBuf::from("runs").join(format!("{}-compare", preset.name()))
        })
    }

    /// Flags given that have no effect with the others, each as a warning naming it.
    pub fn warnings(&self, config: &TrainConfig) -> Vec<String> {
        let mut warnings = Vec::new();
        let mut warn = |given: bool, message: &str| {
            if given {
                warnings.push(message.to_string());
            }
        };
        let own_text = config.data.text.is_some() || config.data.jsonl.is_some();
        warn(
            self.cache_dir.is_some() && own_text,
            "`--cache-dir` has no effect with `--text` or `--jsonl` (it is where the default corpus is kept)",
        );
        warn(
            self.min_freq.is_some() && config.data.tokenizer == TokenizerKind::Bpe,
            "`--min-freq` has no effect with `--tokenizer bpe` (it prunes the character vocabulary)",
        );
        warn(
            self.min_freq.is_some() && self.resume,
            "`--min-freq` has no effect with `--resume` (the run keeps its tokenizer)",
        );
        warn(
            config.task != TaskKind::Text && (self.tokenizer.is_some() || self.min_freq.is_some()),
            "`--tokenizer` and `--min-freq` have no effect on the digits tasks (their vocabulary is fixed)",
        );
        warn(
            config.model.dense
                && (self.experts.is_some() || self.gate.is_some() || self.aux_loss_weight.is_some()),
            "`--experts`, `--gate` and `--aux-loss-weight` have no effect with `--dense` (the dense model has no router; only `--top-k` and the expert size set its width)",
        );
        warn(
            self.digits.is_some() && config.task == TaskKind::Text,
            "`--digits` has no effect on the text task (it picks the digits tasks' images)",
        );
        warn(
            self.stop_after.is_some_and(|last| last >= config.run.steps),
            "`--stop-after` is at or past `--steps`, so it has no effect",
        );
        let hf = self.init_hf.is_some();
        warn(
            hf && (self.experts.is_some()
                || self.top_k.is_some()
                || self.gate.is_some()
                || self.aux_loss_weight.is_some()),
            "`--experts`, `--top-k`, `--gate` and `--aux-loss-weight` have no effect with `--init-hf` (the Hugging Face model's `config.json` sets its architecture)",
        );
        warn(
            hf && (self.tokenizer.is_some() || self.min_freq.is_some()),
            "`--tokenizer` and `--min-freq` have no effect with `--init-hf` (the model's `tokenizer.json` is used)",
        );
        warn(
            self.parallel.is_some() && config.run.devices.len() < 2,
            "`--parallel` has no effect on one device (it says how several `--devices` are used)",
        );
        let remote = config
            .run
            .devices
            .iter()
            .any(|device| device.starts_with("ws://"));
        warn(
            self.token.is_some() && !remote,
            "`--token` has no effect without a `ws://` server in `--devices` (it is what such servers were started with)",
        );
        warn(
            self.resume && self.seed.is_some(),
            "`--seed` has no effect with `--resume` (the run continues its saved random streams and data order)",
        );
        warnings
    }
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
