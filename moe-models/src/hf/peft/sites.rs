//! Where PEFT puts LoRA adapters on a transformers MoE model, and which of our weights each
//! place is.
//!
//! transformers 5 holds a Mixtral, Qwen2-MoE or OLMoE layer's experts as two 3-D parameters of
//! one module, `mlp.experts.gate_up_proj: [E, 2h, d]` (the gate projection's outputs, then the
//! up projection's) and `mlp.experts.down_proj: [E, d, h]`, and its router as the parameter
//! `mlp.gate.weight: [E, d]`; PEFT adapts parameters through `target_parameters`, everything
//! else (attention, shared experts, dense layers, Qwen2-MoE's `shared_expert_gate`) is an
//! `nn.Linear` named in `target_modules`. When both expert parameters carry adapters, PEFT
//! wraps the module twice, in the order transformers registers them: `gate_up_proj`'s tensors
//! are then under `experts.base_layer`, `down_proj`'s under `experts`.

use moe_core::lora::LoraAdapter;

use crate::MoeTransformer;

/// What PEFT's config names to reach a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum PeftTarget {
    /// An `nn.Linear`, by the last part of its module path (`target_modules`).
    Module(&'static str),
    /// A parameter, by `<module>.<parameter>` below the layer (`target_parameters`).
    Parameter(&'static str),
}

/// The router's weight in `target_parameters`.
pub(super) const ROUTER: &str = "mlp.gate.weight";
/// The fused gate and up projections of the experts in `target_parameters`.
pub(super) const GATE_UP: &str = "mlp.experts.gate_up_proj";
/// The experts' down projection in `target_parameters`.
pub(super) const DOWN: &str = "mlp.experts.down_proj";

/// How a site's tensors map onto our weights.
#[derive(Debug, Clone)]
pub(super) enum Form<'a> {
    /// An `nn.Linear` or 2-D parameter `[out, in]`, or a 3-D expert stack `[E, out, in]`: one
    /// weight of ours, `[in, out]` or `[E, in, out]` (a one-expert stack for the shared
    /// experts and dense layers).
    Plain(Ours<'a>),
    /// `gate_up_proj`: our gate and up projections of the same experts.
    GateUp {
        /// Our `w_gate`.
        gate: Ours<'a>,
        /// Our `w_in`.
        up: Ours<'a>,
    },
}

/// One of our weights: its module path and its adapter, if it has one.
#[derive(Debug, Clone)]
pub(super) struct Ours<'a> {
    /// E.g. `stack.blocks.0.ffn.moe.experts.w_out`.
    pub path: String,
    /// Its LoRA adapter.
    pub adapter: Option<&'a LoraAdapter>,
}

/// One place PEFT can adapt.
#[derive(Debug, Clone)]
pub(super) struct Site<'a> {
    /// The tensors' prefix: `base_model.model.<module>`; `.lora_A.weight` and `.lora_B.weight`
    /// follow.
    pub prefix: String,
    /// The name PEFT matches `rank_pattern` and `alpha_pattern` keys against: the module path,
    /// or `<module>.<parameter>` for a parameter.
    pub key: String,
    /// How the config names it.
    pub target: PeftTarget,
    /// Our weights.
    pub form: Form<'a>,
}

impl<'a> Form<'a> {
    /// Our weights here: one, or the gate's then the up projection's.
    pub fn ours(&self) -> Vec<&Ours<'a>> {
        match self {
            Form::Plain(ours) => vec![ours],
            Form::GateUp { gate, up } => vec![gate, up],
        }
    }
}

impl Site<'_> {
    /// Whether every weight of ours at this site has an adapter (`Some(true)`), none has
    /// (`Some(false)`), or only some do (`None`: the gate and up projections differ).
    pub fn adapted(&self) -> Option<bool> {
        let ours = self.form.ours();
        let adapted = ours.iter().filter(|o| o.adapter.is_some()).count();
        match adapted {
            0 => Some(false),
            n if n == ours.len() => Some(true),
            _ => None,
        }
    }

    /// The name of PEFT's tensor for `factor` (`"A"` or `"B"`) here.
    pub fn factor_name(&self, factor: &str) -> String {
        format!("{}.lora_{factor}.weight", self.prefix)
    }
}

/// Every site of `model`, a model loaded from a Hugging Face folder (its layers named as
/// transformers names them). `both_expert_parameters`: whether the adapters hold both expert
/// parameters of a layer, which decides where PEFT writes `gate_up_proj`'s tensors.
pub(super) fn sites(model: &MoeTransformer, both_expert_parameters: bool) -> Vec<Site<'_>> {
    let mut out = Vec::new();
    for (i, block) in model.stack.blocks.iter().enumerate() {
        let ours = format!("stack.blocks.{i}");
        let layer = format!("model.layers.{i}");
        let attention = &block.attention;
        for (linear, field, name) in [
            (&attention.query, "query", "q_proj"),
            (&attention.key, "key", "k_proj"),
            (&attention.value, "value", "v_proj"),
            (&attention.output, "output", "o_proj"),
        ] {
            out.push(linear_site(
                &format!("{layer}.self_attn.{name}"),
                name,
                format!("{ours}.attention.{field}.weight"),
                linear.weight.reparameterization(),
            ));
        }
        if let Some(moe) = &block.ffn.moe {
            let mlp = format!("{layer}.mlp");
            let (module, key) = (format!("{mlp}.gate"), format!("{mlp}.gate.weight"));
            out.push(Site {
                prefix: format!("base_model.model.{module}"),
                key,
                target: PeftTarget::Parameter(ROUTER),
                form: Form::Plain(Ours {
                    path: format!("{ours}.ffn.moe.router.weight"),
                    adapter: moe.router.weight.reparameterization(),
                }),
            });
            let experts = &moe.experts;
            let stack = format!("{ours}.ffn.moe.experts");
            let gate_up_module = if both_expert_parameters {
                format!("{mlp}.experts.base_layer")
            } else {
                format!("{mlp}.experts")
            };
            if let Some(w_gate) = &experts.w_gate {
                out.push(Site {
                    prefix: format!("base_model.model.{gate_up_module}"),
                    key: format!("{mlp}.experts.gate_up_proj"),
                    target: PeftTarget::Parameter(GATE_UP),
                    form: Form::GateUp {
                        gate: Ours {
                            path: format!("{stack}.w_gate"),
                            adapter: w_gate.reparameterization(),
                        },
                        up: Ours {
                            path: format!("{stack}.w_in"),
                            adapter: experts.w_in.reparameterization(),
                        },
                    },
                });
            }
            out.push(Site {
                prefix: format!("base_model.model.{mlp}.experts"),
                key: format!("{mlp}.experts.down_proj"),
                target: PeftTarget::Parameter(DOWN),
                form: Form::Plain(Ours {
                    path: format!("{stack}.w_out"),
                    adapter: experts.w_out.reparameterization(),
                }),
            });
            if let Some(shared) = &moe.shared_experts {
                swiglu_sites(
                    &mut out,
                    &format!("{mlp}.shared_expert"),
                    &format!("{ours}.ffn.moe.shared_experts"),
                    shared,
                );
            }
            if let Some(gate) = &moe.shared_gate {
                out.push(linear_site(
                    &format!("{mlp}.shared_expert_gate"),
                    "shared_expert_gate",
                    format!("{ours}.ffn.moe.shared_gate"),
                    gate.reparameterization(),
                ));
            }
        } else if let Some(dense) = &block.ffn.dense {
            swiglu_sites(
                &mut out,
                &format!("{layer}.mlp"),
                &format!("{ours}.ffn.dense"),
                dense,
            );
        }
    }
    out
}

/// The `nn.Linear` at `module` (named `name` in `target_modules`): our weight `path`.
fn linear_site<'a>(
    module: &str,
    name: &'static str,
    path: String,
    adapter: Option<&'a LoraAdapter>,
) -> Site<'a> {
    Site {
        prefix: format!("base_model.model.{module}"),
        key: module.to_string(),
        target: PeftTarget::Module(name),
        form: Form::Plain(Ours { path, adapter }),
    }
}

/// A LLaMA-style MLP of `nn.Linear`s at `module` (`gate_proj`, `up_proj`, `down_proj`): our
/// one-expert stack at `path`.
fn swiglu_sites<'a>(
    out: &mut Vec<Site<'a>>,
    module: &str,
    path: &str,
    experts: &'a moe_core::Experts,
) {
    if let Some(w_gate) = &experts.w_gate {
        out.push(linear_site(
            &format!("{module}.gate_proj"),
            "gate_proj",
            format!("{path}.w_gate"),
            w_gate.reparameterization(),
        ));
    }
    out.push(linear_site(
        &format!("{module}.up_proj"),
        "up_proj",
        format!("{path}.w_in"),
        experts.w_in.reparameterization(),
    ));
    out.push(linear_site(
        &format!("{module}.down_proj"),
        "down_proj",
        format!("{path}.w_out"),
        experts.w_out.reparameterization(),
    ));
}
