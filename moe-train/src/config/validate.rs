//! The ranges and combinations a [`TrainConfig`] must keep; each error names the field and
//! the value.

use super::*;

impl TrainConfig {
    /// Checks every field against its range, and the combinations that would make the run
    /// something other than what it says (an "MoE" model without an MoE layer, a warm-up
    /// longer than the run, ...). Each error names the field and the value.
    pub fn validate(&self) -> Result<()> {
        self.validate_data()?;
        self.validate_model()?;
        self.validate_optim()?;
        self.validate_run()?;
        if self.optim.warmup_steps > self.run.steps {
            return bad(format!(
                "`optim.warmup_steps` (`--warmup`) {} is more than `run.steps` (`--steps`) {}: the learning rate would never reach `lr`",
                self.optim.warmup_steps, self.run.steps
            ));
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<()> {
        let d = &self.data;
        if d.jsonl.is_some() != d.field.is_some() {
            return bad("`--jsonl FILE` needs `--field NAME` (and `field` needs `jsonl`)".into());
        }
        if d.text.is_some() && d.jsonl.is_some() {
            return bad("give either `--text` or `--jsonl`, not both".into());
        }
        if let Some(cache) = &d.cache_dir {
            if cache.exists() && !cache.is_dir() {
                return bad(format!(
                    "`--cache-dir` {} is a file, not a folder; give the folder the corpus is kept in",
                    cache.display()
                ));
            }
        }
        if self.task != TaskKind::Text && (d.text.is_some() || d.jsonl.is_some()) {
            return bad(format!(
                "`--text` and `--jsonl` give the text task its corpus; the `{}` task draws its own digit images (leave them out, or use `--task text`)",
                self.task.name()
            ));
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 0.5) {
            return bad(format!(
                "`data.val_fraction` must be in (0, 0.5), got {}",
                d.val_fraction
            ));
        }
        in_range("data.image_levels", d.image_levels, 2, 256)?;
        in_range("data.min_freq", d.min_freq, 1, 1 << 30)?;
        in_range("data.bpe_vocab_size", d.bpe_vocab_size, 260, 1 << 20)
    }

    fn validate_model(&self) -> Result<()> {
        let (m, v) = (&self.model, &self.variant);
        if let Some(lora) = &v.lora {
            if v.hf.is_none() {
                return bad("LoRA (`--lora-rank`) fine-tunes a Hugging Face model: give it with `--init-hf DIR`".into());
            }
            lora.validate()
                .map_err(|error| TrainError::Config(error.to_string()))?;
        }
        if let Some(hf) = &v.hf {
            if self.task != TaskKind::Text || v.dense {
                return bad("`--init-hf` fine-tunes a Hugging Face text model: it needs `--task text` and no `--dense`".into());
            }
            if let Some(lora) = &v.lora {
                check_lora_rank(lora, &hf.config.decoder)?;
            }
            if v.lora.is_none() && !hf.weights.is_f32() {
                return bad(format!(
                    "`variant.hf.weights` (`--weights`) {:?} holds the frozen weights of a LoRA run; full fine-tuning trains every weight in f32: add `--lora-rank R` or leave `--weights` out",
                    hf.weights
                ));
            }
            let context = hf.config.decoder.context_length;
            if m.context_length > context {
                return bad(format!(
                    "`model.context_length` (`--context`) {} is longer than the Hugging Face model's context ({context})",
                    m.context_length
                ));
            }
        }
        m.validate()
            .map_err(|error| TrainError::Config(for_the_user(&error)))?;
        self.check_limits()?;
        if !v.dense && m.num_moe_layers() == 0 {
            return bad(if m.moe_every == 0 {
                "`model.moe_every` is 0, which leaves no MoE layer; train the dense model with `--dense` instead".into()
            } else {
                format!(
                    "`model.moe_every` {} leaves no MoE layer in `model.num_layers` {} (MoE goes in every `moe_every`-th block, counted from 1, except `model.dense_layers`)",
                    m.moe_every, m.num_layers
                )
            });
        }
        Ok(())
    }

    /// The largest sizes and factors this program trains with, beyond the models' own rules
    /// (which have no upper bounds): a value past them is a slip of the finger, better named
    /// now than met as an allocation failure.
    fn check_limits(&self) -> Result<()> {
        let (m, moe) = (&self.model, &self.model.moe);
        for (name, value, high) in [
            ("model.d_model", m.d_model, 1 << 16),
            ("model.num_layers", m.num_layers, 1024),
            ("model.context_length", m.context_length, 1 << 20),
            ("model.d_ff", m.d_ff, 1 << 20),
            ("model.moe.num_experts", moe.num_experts, 1 << 20),
            ("model.moe.expert.d_hidden", moe.expert.d_hidden, 1 << 20),
            ("model.moe.shared_experts", moe.shared_experts, 64),
        ] {
            in_range(name, value, 0, high)?;
        }
        for (name, value, high) in [
            (
                "model.moe.capacity.train_factor",
                moe.capacity.train_factor,
                1000.0,
            ),
            (
                "model.moe.capacity.eval_factor",
                moe.capacity.eval_factor,
                1000.0,
            ),
            ("model.moe.routed_scale", moe.routed_scale, 1000.0),
            (
                "model.moe.losses.balance_weight",
                moe.losses.balance_weight,
                100.0,
            ),
            (
                "model.moe.losses.z_loss_weight",
                moe.losses.z_loss_weight,
                100.0,
            ),
        ] {
            if value > high {
                return bad(format!(
                    "{} must be at most {high}, got {value}",
                    with_flag(name)
                ));
            }
        }
        Ok(())
    }

    fn validate_optim(&self) -> Result<()> {
        let o = &self.optim;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad(format!(
                "`optim.lr` must be a finite number > 0, got {}",
                o.lr
            ));
        }
        if !(o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return bad(format!(
                "`optim.min_lr` must be in [0, optim.lr = {}], got {}; the schedule decays from `lr` down to `min_lr`",
                o.lr, o.min_lr
            ));
        }
        if !(o.weight_decay.is_finite() && (0.0..=1.0).contains(&o.weight_decay)) {
            return bad(format!(
                "`optim.weight_decay` must be in [0, 1], got {}",
                o.weight_decay
            ));
        }
        if !(o.grad_clip.is_finite() && o.grad_clip >= 0.0) {
            return bad(format!(
                "`optim.grad_clip` must be a finite number >= 0 (0: no clipping), got {}",
                o.grad_clip
            ));
        }
        in_range("optim.batch_size", o.batch_size, 1, 1 << 20)?;
        in_range("optim.grad_accum", o.grad_accum, 1, 1 << 16)
    }

    fn validate_run(&self) -> Result<()> {
        let r = &self.run;
        in_range("run.steps", r.steps, 1, 1_000_000_000)?;
        in_range("run.eval_every", r.eval_every, 1, usize::MAX)?;
        in_range("run.eval_batches", r.eval_batches, 1, 1 << 20)?;
        in_range("run.log_every", r.log_every, 1, usize::MAX)?;
        in_range("run.checkpoint_every", r.checkpoint_every, 1, usize::MAX)?;
        in_range("run.keep_checkpoints", r.keep_checkpoints, 1, 1 << 20)?;
        in_range("run.samples", r.samples, 0, 1000)?;
        in_range("run.sample_tokens", r.sample_tokens, 1, 1 << 16)?;
        for device in &r.devices {
            DeviceSpec::parse(device)?;
        }
        let explosion = &r.explosion;
        if !(explosion.ratio.is_finite() && explosion.ratio > 1.0) {
            return bad(format!(
                "`run.explosion.ratio` must be a finite number above 1, got {}",
                explosion.ratio
            ));
        }
        if !(explosion.nats.is_finite() && explosion.nats >= 0.0) {
            return bad(format!(
                "`run.explosion.nats` must be a finite number of at least 0, got {}",
                explosion.nats
            ));
        }
        in_range(
            "run.explosion.logged_steps",
            explosion.logged_steps,
            1,
            1 << 20,
        )?;
        let replicas = r.devices.len();
        if r.offload_experts {
            if self.variant.dense {
                return bad("`--offload-experts` keeps the experts in CPU memory, but `--dense` trains a model without experts: leave one of them out".into());
            }
            if replicas > 1 && r.parallel.places_experts() {
                return bad(format!(
                    "`--offload-experts` keeps every expert in CPU memory, but `--parallel {}` spreads them over the {replicas} devices: give `--parallel data`, or leave `--offload-experts` out",
                    r.parallel.name()
                ));
            }
        }
        if replicas > 1
            && r.parallel.splits_batch()
            && !self.optim.batch_size.is_multiple_of(replicas)
        {
            return bad(format!(
                "`--parallel {}` splits each micro-batch over the {replicas} devices, but `--batch-size` {} does not divide by {replicas}: give a multiple of {replicas}, or `--parallel experts`",
                r.parallel.name(),
                self.optim.batch_size
            ));
        }
        // (A Hugging Face model's own expert count is checked when its experts are placed.)
        let preset_experts = !self.variant.dense && self.variant.hf.is_none();
        if replicas > 1 && r.parallel.places_experts() && preset_experts {
            let experts = self.model.moe.num_experts;
            if experts < replicas {
                return bad(format!(
                    "`--parallel {}` spreads each MoE layer's {experts} experts over the {replicas} devices: give at most {experts} devices, or `--parallel data`",
                    r.parallel.name()
                ));
            }
        }
        Ok(())
    }
}

/// Refuses a LoRA rank above the smaller side of a weight it targets: an adapter `A B` of rank
/// `r` on a `[m, n]` weight adds `r (m + n)` parameters for an update of rank at most
/// `min(m, n)`, so a larger rank trains more parameters than the weight has without reaching
/// further. The sides: attention's `d_model` and key/value width, the routers' `d_model` and
/// expert count (Qwen2-MoE's one-column shared-expert gate aside), the experts' `d_model` and
/// hidden widths (the shared experts' and the dense layers' `d_ff` where there are some).
fn check_lora_rank(lora: &LoraConfig, decoder: &DecoderConfig) -> Result<()> {
    let d_model = decoder.d_model;
    let heads = decoder.num_heads.max(1);
    let key_value = decoder.num_kv_heads.unwrap_or(heads) * (d_model / heads);
    let moe = &decoder.moe;
    let dense_layers = decoder.moe_every > 1 || !decoder.dense_layers.is_empty();
    for target in &lora.targets {
        let (side, what) = match target {
            LoraTarget::Attention => (d_model.min(key_value), "attention projections"),
            LoraTarget::Router => (d_model.min(moe.num_experts), "routers"),
            LoraTarget::Experts => {
                let mut side = d_model.min(moe.expert.d_hidden);
                if moe.shared_experts > 0 {
                    let shared = moe.shared_experts * moe.expert.d_hidden;
                    side = side.min(moe.shared_d_hidden.unwrap_or(shared));
                }
                if dense_layers {
                    side = side.min(decoder.d_ff);
                }
                (side, "experts' weights")
            }
        };
        if lora.rank > side {
            return bad(format!(
                "`--lora-rank` {} is larger than the smaller side of the {what} it adapts ({side}); give at most {side}",
                lora.rank
            ));
        }
    }
    Ok(())
}

/// An error naming a config value out of range.
fn bad(message: String) -> Result<()> {
    Err(TrainError::Config(message))
}

/// Checks `low <= value <= high`, naming the field (and its flag).
fn in_range(name: &str, value: usize, low: usize, high: usize) -> Result<()> {
    if value < low || value > high {
        let range = if high == usize::MAX {
            format!("at least {low}")
        } else {
            format!("in [{low}, {high}]")
        };
        return bad(format!("{} must be {range}, got {value}", with_flag(name)));
    }
    Ok(())
}

/// `name` (a config key) quoted, followed by the flag that sets it if one does:
/// "`model.moe.top_k` (`--top-k`)".
fn with_flag(name: &str) -> String {
    match crate::cli::flag_for(name) {
        Some(flag) => format!("`{name}` (`{flag}`)"),
        None => format!("`{name}`"),
    }
}

/// A model crate's error with each field it names (by its path in the crate's config:
/// `top_k`, `capacity.train_factor`) written as the user knows it: its key in the config file
/// (`model.moe.top_k`) and the flag that sets it (`--top-k`).
fn for_the_user(error: &moe_models::ModelError) -> String {
    let (section, message) = match error {
        moe_models::ModelError::Moe(_) => ("model.moe.", error.to_string()),
        _ => ("model.", error.to_string()),
    };
    let is_field = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
    };
    // Between backticks are the odd parts of the split.
    let mut out = String::new();
    for (index, part) in message.split('`').enumerate() {
        match index % 2 {
            1 if is_field(part) => out.push_str(&with_flag(&format!("{section}{part}"))),
            1 => out.push_str(&format!("`{part}`")),
            _ => out.push_str(part),
        }
    }
    out
}
