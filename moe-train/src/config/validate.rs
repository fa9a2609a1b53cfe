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
        let m = &self.model;
        if let Some(lora) = &m.lora {
            if m.hf.is_none() {
                return bad("LoRA (`--lora-rank`) fine-tunes a Hugging Face model: give it with `--init-hf DIR`".into());
            }
            lora.validate()
                .map_err(|error| TrainError::Config(error.to_string()))?;
        }
        if let Some(hf) = &m.hf {
            if self.task != TaskKind::Text || m.dense {
                return bad("`--init-hf` fine-tunes a Hugging Face text model: it needs `--task text` and no `--dense`".into());
            }
            if let Some(lora) = &m.lora {
                check_lora_rank(lora, &hf.config.decoder)?;
            }
            let context = hf.config.decoder.context_length;
            if m.context_length > context {
                return bad(format!(
                    "`model.context_length` {} is longer than the Hugging Face model's context ({context})",
                    m.context_length
                ));
            }
        }
        in_range("model.d_model", m.d_model, 1, 1 << 16)?;
        in_range("model.num_layers", m.num_layers, 1, 1024)?;
        in_range("model.num_heads", m.num_heads, 1, m.d_model)?;
        in_range("model.context_length", m.context_length, 1, 1 << 20)?;
        in_range("model.d_ff", m.d_ff, 1, 1 << 20)?;
        in_range("model.experts", m.experts, 1, 1 << 20)?;
        in_range("model.top_k", m.top_k, 1, m.experts)?;
        in_range("model.expert_hidden", m.expert_hidden, 1, 1 << 20)?;
        in_range("model.shared_experts", m.shared_experts, 0, 64)?;
        if !m.dense {
            if m.moe_every == 0 {
                return bad("`model.moe_every` is 0, which leaves no MoE layer; train the dense model with `--dense` instead".into());
            }
            if m.moe_every > m.num_layers {
                return bad(format!(
                    "`model.moe_every` {} is larger than `model.num_layers` {}, which leaves no MoE layer (MoE goes in every `moe_every`-th block)",
                    m.moe_every, m.num_layers
                ));
            }
        }
        for (name, value) in [
            ("model.capacity_factor", m.capacity_factor),
            ("model.eval_capacity_factor", m.eval_capacity_factor),
            ("model.routed_scale", m.routed_scale),
        ] {
            if !(value.is_finite() && value > 0.0 && value <= 1000.0) {
                return bad(format!("`{name}` must be in (0, 1000], got {value}"));
            }
        }
        for (name, value) in [
            ("model.aux_loss_weight", m.aux_loss_weight),
            ("model.z_loss_weight", m.z_loss_weight),
        ] {
            if !(value.is_finite() && (0.0..=100.0).contains(&value)) {
                return bad(format!("`{name}` must be in [0, 100], got {value}"));
            }
        }
        if !(m.dropout.is_finite() && (0.0..1.0).contains(&m.dropout)) {
            return bad(format!(
                "`model.dropout` must be in [0, 1), got {}",
                m.dropout
            ));
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
        if replicas > 1 && r.parallel.splits_batch() && self.optim.batch_size % replicas != 0 {
            return bad(format!(
                "`--parallel {}` splits each micro-batch over the {replicas} devices, but `--batch-size` {} does not divide by {replicas}: give a multiple of {replicas}, or `--parallel experts`",
                r.parallel.name(),
                self.optim.batch_size
            ));
        }
        // (A Hugging Face model's own expert count is checked when its experts are placed.)
        let preset_experts = !self.model.dense && self.model.hf.is_none();
        if replicas > 1 && r.parallel.places_experts() && preset_experts {
            let experts = self.model.experts;
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

/// Checks `low <= value <= high`, naming the field.
fn in_range(name: &str, value: usize, low: usize, high: usize) -> Result<()> {
    if value < low || value > high {
        let range = if high == usize::MAX {
            format!("at least {low}")
        } else {
            format!("in [{low}, {high}]")
        };
        return bad(format!("`{name}` must be {range}, got {value}"));
    }
    Ok(())
}
