//! `burn-moe train`'s flags (also `compare`'s), how they write into the resolved config, and
//! the warnings for flags that have no effect beside the others.

use std::path::PathBuf;

use clap::Args;
use moe_core::lora::{LoraConfig, LoraTarget};

use crate::cli::HeldWeights;
use crate::config::{
    CorpusChoice, DigitSource, GateName, Preset, TaskKind, TokenizerKind, TrainConfig,
};
use crate::error::{Result, TrainError};
use crate::runtime::backend::{BackendChoice, Precision};
use crate::store::checkpoint;
use crate::training::divergence::OnNonFinite;
use crate::training::parallel::Parallelism;
use crate::training::replicas::ReducePrecision;

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
    /// Continue from LoRA adapters trained elsewhere: a PEFT folder (`adapter_config.json`,
    /// `adapter_model.safetensors`) for the `--init-hf` model, with adapters on any of its
    /// attention projections, routers and experts; the folder sets the run's rank (its
    /// largest), alpha and targets.
    #[arg(long, requires = "init_hf", conflicts_with_all = ["lora_rank", "lora_alpha", "lora_targets"])]
    pub init_lora: Option<PathBuf>,
    /// LoRA's alpha: the adapters' updates are scaled by `alpha / rank` (default: `2 * rank`).
    #[arg(long, requires = "lora_rank")]
    pub lora_alpha: Option<f64>,
    /// How a LoRA run holds the model's frozen weights (attention, experts, feed-forward):
    /// f32, bf16, or quantized to 8 or 4 bits with a scale per 64 values (QLoRA); norms,
    /// routers and the adapters stay f32, embeddings bf16 below f32.
    #[arg(long, value_enum, requires = "init_hf")]
    pub weights: Option<HeldWeights>,
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
    /// What the data-parallel replicas' gradients travel as: `f32` (the default), or `bf16`
    /// (half the bytes; each device's gradients and the sums rounded to bf16, on devices that
    /// hold bf16: flex, CUDA).
    #[arg(long, value_enum)]
    pub all_reduce: Option<ReducePrecision>,
    /// Keep every MoE layer's experts (and their optimizer state) in CPU memory, the rest of
    /// the model on the GPU.
    #[arg(long)]
    pub offload_experts: bool,
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
    /// The MoE gate (`model.moe.gate`, with that gate's defaults).
    #[arg(long, value_enum)]
    pub gate: Option<GateName>,
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
    /// Weight of the router z-loss (`model.moe.losses.z_loss_weight`; ST-MoE, Zoph et al.
    /// 2022): the mean squared log-sum-exp of the router logits, which keeps them small.
    #[arg(long)]
    pub z_loss_weight: Option<f64>,
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
        let mut config = self.base_config()?;
        self.write_run_flags(&mut config);
        self.write_data_flags(&mut config);
        self.write_model_flags(&mut config)?;
        Ok(config)
    }

    /// What the flags go on top of: the saved config when resuming, else the preset with the
    /// config file over it.
    fn base_config(&self) -> Result<TrainConfig> {
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
        if self.resume {
            let out = self.out_dir();
            crate::store::run_dir::check_is_folder(&out)?;
            checkpoint::read_config(&out)
        } else {
            let preset = self.preset.unwrap_or(Preset::Tiny);
            TrainConfig::from_preset_and_file(preset, self.config.as_deref())
        }
    }

    /// The `optim` and `run` flags. A warm-up longer than the run (from the preset or a file,
    /// not from `--warmup`) is cut to a tenth of the run, with a note.
    fn write_run_flags(&self, config: &mut TrainConfig) {
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
        set(&mut config.optim.batch_size, self.batch_size);
        set(&mut config.optim.grad_accum, self.grad_accum);
        if let Some(lr) = self.lr {
            // The preset's ratio of final to peak learning rate is kept.
            let ratio = config.optim.min_lr / config.optim.lr;
            config.optim.lr = lr;
            if lr.is_finite() && ratio.is_finite() {
                config.optim.min_lr = lr * ratio;
            }
        }
        set(&mut config.optim.grad_clip, self.grad_clip);
        let run = &mut config.run;
        set(&mut run.eval_every, self.eval_every);
        set(&mut run.checkpoint_every, self.checkpoint_every);
        set(&mut run.keep_checkpoints, self.keep);
        set(&mut run.samples, self.samples);
        set(&mut run.backend, self.backend);
        set(&mut run.devices, self.devices.clone());
        set(&mut run.parallel, self.parallel);
        set(&mut run.all_reduce, self.all_reduce);
        if self.offload_experts {
            run.offload_experts = true;
        }
        set(&mut run.precision, self.precision);
        set(&mut run.on_nonfinite, self.on_nonfinite);
        set(&mut run.seed, self.seed);
    }

    /// The task and `data` flags.
    fn write_data_flags(&self, config: &mut TrainConfig) {
        set(&mut config.task, self.task);
        let data = &mut config.data;
        if !self.resume {
            // A resumed run keeps its tokenizer, so `--min-freq` only warns (`warnings`).
            set(&mut data.min_freq, self.min_freq);
        }
        set(&mut data.corpus, self.corpus);
        set(&mut data.digits, self.digits);
        if self.text.is_some() {
            data.text = self.text.clone();
        }
        if self.jsonl.is_some() {
            data.jsonl = self.jsonl.clone();
            data.field = self.field.clone();
        }
        if self.cache_dir.is_some() {
            data.cache_dir = self.cache_dir.clone();
        }
        set(&mut data.tokenizer, self.tokenizer);
    }

    /// The `model` and `variant` flags, each into the field of the config that owns it
    /// (`model` is moe-models' `DecoderConfig`, `model.moe` moe-core's `MoeConfig`).
    fn write_model_flags(&self, config: &mut TrainConfig) -> Result<()> {
        let moe = &mut config.model.moe;
        set(&mut moe.num_experts, self.experts);
        set(&mut moe.top_k, self.top_k);
        if let Some(gate) = self.gate {
            moe.gate = gate.config();
            match gate {
                GateName::Switch => moe.top_k = self.top_k.unwrap_or(1),
                GateName::Gshard => moe.top_k = self.top_k.unwrap_or(2),
                _ => {}
            }
        }
        set(&mut moe.losses.balance_weight, self.aux_loss_weight);
        set(&mut moe.losses.z_loss_weight, self.z_loss_weight);
        set(&mut config.model.context_length, self.context);
        if self.dense {
            config.variant.dense = true;
        }
        if let Some(dir) = &self.init_hf {
            let mut hf = crate::config::HfInit::read(dir)?;
            hf.weights = self.weights.unwrap_or_default();
            config.variant.hf = Some(hf);
        }
        if let Some(rank) = self.lora_rank {
            config.variant.lora = Some(self.lora_config(rank));
        }
        if let Some(dir) = &self.init_lora {
            let adapters = moe_models::hf::peft::read_adapter_config(dir)?;
            config.variant.lora = Some(adapters.lora_config());
            if let Some(hf) = &mut config.variant.hf {
                hf.init_lora = Some(std::path::absolute(dir).unwrap_or_else(|_| dir.clone()));
            }
        }
        Ok(())
    }

    /// `--lora-rank`'s adapters: on the weights `--lora-targets` names (each once; the
    /// attention projections when none is named), scaled by `--lora-alpha`.
    fn lora_config(&self, rank: usize) -> LoraConfig {
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
        LoraConfig::new(rank)
            .with_alpha(self.lora_alpha)
            .with_targets(targets)
    }
}

/// `slot = value` where a flag gave one.
fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

impl TrainArgs {
    /// The flags given that set the MoE layer's router (its gate, expert count and loss
    /// weights), which neither the dense twin nor a Hugging Face model reads.
    fn router_flags_given(&self) -> Vec<&'static str> {
        [
            ("--experts", self.experts.is_some()),
            ("--gate", self.gate.is_some()),
            ("--aux-loss-weight", self.aux_loss_weight.is_some()),
            ("--z-loss-weight", self.z_loss_weight.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }

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
        let router = self.router_flags_given();
        warn(
            config.variant.dense && !router.is_empty(),
            &format!(
                "{} no effect with `--dense` (the dense model has no router; only `--top-k` and the expert size set its width)",
                have(&router)
            ),
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
        let mut architecture = router;
        if self.top_k.is_some() {
            architecture.push("--top-k");
        }
        warn(
            hf && !architecture.is_empty(),
            &format!(
                "{} no effect with `--init-hf` (the Hugging Face model's `config.json` sets its architecture)",
                have(&architecture)
            ),
        );
        warn(
            hf && (self.tokenizer.is_some() || self.min_freq.is_some()),
            "`--tokenizer` and `--min-freq` have no effect with `--init-hf` (the model's `tokenizer.json` is used)",
        );
        warn(
            self.parallel.is_some() && config.run.devices.len() < 2,
            "`--parallel` has no effect on one device (it says how several `--devices` are used)",
        );
        warn(
            self.all_reduce.is_some()
                && (config.run.devices.len() < 2 || !config.run.parallel.splits_batch()),
            "`--all-reduce` has no effect without data parallelism (several `--devices`, `--parallel both` or `data`)",
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

/// The flag of `train` that sets the config key `key` (`model.moe.top_k` -> `--top-k`), for
/// messages about the key's value; `None` for a key only config files set.
pub fn flag_for(key: &str) -> Option<&'static str> {
    MODEL_FLAGS
        .iter()
        .find(|(name, _)| *name == key)
        .map(|(_, flag)| *flag)
}

/// The `model` keys that `train`'s flags set.
const MODEL_FLAGS: [(&str, &str); 6] = [
    ("model.context_length", "--context"),
    ("model.moe.num_experts", "--experts"),
    ("model.moe.top_k", "--top-k"),
    ("model.moe.gate", "--gate"),
    ("model.moe.losses.balance_weight", "--aux-loss-weight"),
    ("model.moe.losses.z_loss_weight", "--z-loss-weight"),
];

/// "`--a` has" / "`--a` and `--b` have" / "`--a`, `--b` and `--c` have", for warnings.
fn have(flags: &[&str]) -> String {
    let quoted: Vec<String> = flags.iter().map(|flag| format!("`{flag}`")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => format!("{one} has"),
        [rest @ .., last] => format!("{} and {last} have", rest.join(", ")),
    }
}
