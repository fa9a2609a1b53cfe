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
            model: tiny_model(),
            variant: Variant::default(),
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
                all_reduce: ReducePrecision::F32,
                offload_experts: false,
            },
        };
        match self {
            Preset::Tiny => tiny,
            Preset::Small => {
                let mut c = tiny;
                c.data.min_freq = 5;
                let m = &mut c.model;
                (m.d_model, m.num_layers, m.num_heads) = (256, 6, 8);
                (m.context_length, m.d_ff, m.moe_every, m.dropout) = (128, 1024, 2, 0.1);
                let moe = &mut m.moe;
                (moe.d_model, moe.num_experts, moe.top_k) = (256, 8, 2);
                moe.expert.d_hidden = 512;
                moe.capacity.dropless = false;
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
                let m = &mut c.model;
                (m.d_model, m.num_layers, m.num_heads) = (512, 8, 8);
                (m.context_length, m.d_ff, m.moe_every, m.dropout) = (256, 2048, 2, 0.1);
                let moe = &mut m.moe;
                (moe.d_model, moe.num_experts, moe.top_k) = (512, 16, 2);
                moe.expert = ExpertConfig::new(1024).with_kind(ExpertKind::SwiGlu);
                moe.capacity.dropless = false;
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

/// The tiny preset's model: 4 blocks of width 128, every FFN an MoE layer of fine-grained
/// experts (DeepSeekMoE, OLMoE): 64 of width 32, 16 per token, so a token visits the same width
/// (512) as the dense FFN. Of the designs BENCHMARKS.md lists, this one beat its dense twin by
/// the most.
fn tiny_model() -> DecoderConfig {
    let moe = MoeConfig::new(128, 64, ExpertConfig::new(32))
        .with_top_k(16)
        .with_gate(GateConfig::softmax_top_k())
        .with_capacity(
            CapacityConfig::new()
                .with_train_factor(1.25)
                .with_eval_factor(2.0)
                .with_dropless(true),
        )
        .with_losses(
            LossConfig::new()
                .with_balance_weight(0.01)
                .with_z_loss_weight(0.001),
        );
    DecoderConfig::new(64, 128, 4, 4, 512, moe)
        .with_moe_every(1)
        .with_norm(NormKind::RmsNorm)
        .with_positions(PositionKind::Rotary)
        .with_dropout(0.0)
}
