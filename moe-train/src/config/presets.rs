//! The named starting points (`--preset`): tiny for a 2-core CPU, small for a laptop GPU,
//! base for a desktop GPU.

use super::*;

/// Named starting points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// Trains on a 2-core CPU in a few minutes (全唐诗; budget: ten).
    Tiny,
    /// For a laptop GPU (全唐诗).
    Small,
    /// For a desktop GPU (everything).
    Base,
}

impl Preset {
    /// The name the command line uses.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Base => "base",
        }
    }

    /// The preset's config.
    pub fn config(self) -> TrainConfig {
        let tiny = TrainConfig {
            task: TaskKind::Text,
            data: DataConfig {
                corpus: CorpusChoice::Tang,
                text: None,
                jsonl: None,
                field: None,
                cache_dir: None,
                tokenizer: TokenizerKind::Char,
                min_freq: 20,
                bpe_vocab_size: 4000,
                val_fraction: 0.05,
                image_levels: 4,
                digits: DigitSource::Drawn,
            },
            model: ModelConfig {
                d_model: 128,
                num_layers: 4,
                num_heads: 4,
                context_length: 64,
                d_ff: 512,
                // Fine-grained experts (DeepSeekMoE, OLMoE): 64 of width 32, 16 per token, in
                // every block, so a token visits the same width (512) as the dense FFN; of
                // the designs BENCHMARKS.md lists, this one beat its dense twin by the most.
                experts: 64,
                top_k: 16,
                expert_hidden: 32,
                moe_every: 1,
                shared_experts: 0,
                gate: GateChoice::SoftmaxTopK,
                expert: ExpertChoice::Ffn,
                capacity_factor: 1.25,
                eval_capacity_factor: 2.0,
                dropless: true,
                aux_loss_weight: 0.01,
                z_loss_weight: 0.001,
                routed_scale: 1.0,
                dropout: 0.0,
                dense: false,
                hf: None,
                lora: None,
            },
            optim: OptimConfig {
                lr: 3e-3,
                min_lr: 3e-4,
                warmup_steps: 100,
                weight_decay: 0.1,
                grad_clip: 1.0,
                batch_size: 16,
                grad_accum: 1,
            },
            run: RunConfig {
                steps: 1000,
                seed: 42,
                eval_every: 100,
                eval_batches: 4,
                log_every: 10,
                checkpoint_every: 500,
                keep_checkpoints: 3,
                samples: 4,
                sample_tokens: 96,
                backend: BackendChoice::Auto,
                precision: Precision::F32,
                on_nonfinite: OnNonFinite::Stop,
                explosion: ExplosionRule::default(),
                devices: Vec::new(),
                parallel: Parallelism::Both,
            },
        };
        match self {
            Preset::Tiny => tiny,
            Preset::Small => {
                let mut c = tiny;
                c.data.min_freq = 5;
                c.model.dropout = 0.1;
                c.model = ModelConfig {
                    d_model: 256,
                    num_layers: 6,
                    num_heads: 8,
                    context_length: 128,
                    d_ff: 1024,
                    experts: 8,
                    top_k: 2,
                    expert_hidden: 512,
                    moe_every: 2,
                    dropless: false,
                    ..c.model
                };
                c.optim = OptimConfig {
                    lr: 1e-3,
                    min_lr: 1e-4,
                    warmup_steps: 300,
                    batch_size: 32,
                    ..c.optim
                };
                c.run.steps = 6000;
                c.run.eval_every = 500;
                c.run.checkpoint_every = 1000;
                c
            }
            Preset::Base => {
                let mut c = tiny;
                c.data.corpus = CorpusChoice::All;
                c.data.min_freq = 5;
                c.model.dropout = 0.1;
                c.model = ModelConfig {
                    d_model: 512,
                    num_layers: 8,
                    num_heads: 8,
                    context_length: 256,
                    d_ff: 2048,
                    experts: 16,
                    top_k: 2,
                    expert_hidden: 1024,
                    moe_every: 2,
                    dropless: false,
                    expert: ExpertChoice::Swiglu,
                    ..c.model
                };
                c.optim = OptimConfig {
                    lr: 6e-4,
                    min_lr: 6e-5,
                    warmup_steps: 1000,
                    batch_size: 32,
                    ..c.optim
                };
                c.run.steps = 30000;
                c.run.eval_every = 1000;
                c.run.checkpoint_every = 2000;
                c
            }
        }
    }
}
