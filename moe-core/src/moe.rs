//! The Mixture-of-Experts layer: config, module and forward pass.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Bool, Device, Int, Tensor};

use crate::balancing::{updated_bias, BiasBalancingConfig};
use crate::dispatch::DispatchPlan;
use crate::error::{check_nonzero, MoeError};
use crate::gate::{GateConfig, GateInput};
use crate::losses::{router_z_loss, LossConfig, LossKind};
use crate::{CapacityConfig, DropPolicy, ExpertConfig, Experts, Router, RoutingMode, RoutingStats};

/// Configuration of a [`Moe`] layer.
///
/// ```
/// use moe_core::{CapacityConfig, ExpertConfig, ExpertKind, GateConfig, MoeConfig};
///
/// let config = MoeConfig::new(512, 8, ExpertConfig::new(1024).with_kind(ExpertKind::SwiGlu))
///     .with_top_k(2)
///     .with_gate(GateConfig::gshard())
///     .with_capacity(CapacityConfig::new().with_train_factor(1.25));
/// ```
#[derive(Config, Debug)]
pub struct MoeConfig {
    /// Token width.
    pub d_model: usize,
    /// Number of routed experts `E`.
    pub num_experts: usize,
    /// Shape and form of each expert.
    pub expert: ExpertConfig,
    /// Experts per token `k` (token-choice gates; GShard needs 2, Switch 1; ignored by expert
    /// choice).
    #[config(default = 2)]
    pub top_k: usize,
    /// The gate.
    #[config(default = "GateConfig::default()")]
    pub gate: GateConfig,
    /// Capacity limits and drop policy.
    #[config(default = "CapacityConfig::new()")]
    pub capacity: CapacityConfig,
    /// Weights of the auxiliary losses.
    #[config(default = "LossConfig::new()")]
    pub losses: LossConfig,
    /// Shared experts that every token visits besides its routed ones (DeepSeek-MoE,
    /// Qwen-MoE), each of `expert.d_hidden`; 0 for none. They are stored as one expert of
    /// `shared_experts * d_hidden`, which computes the same sum.
    #[config(default = 0)]
    pub shared_experts: usize,
    /// Auxiliary-loss-free balancing (DeepSeek-V3); `None` for off.
    pub balance_bias: Option<BiasBalancingConfig>,
}

impl PartialEq for MoeConfig {
    fn eq(&self, other: &Self) -> bool {
        self.d_model == other.d_model
            && self.num_experts == other.num_experts
            && self.expert == other.expert
            && self.top_k == other.top_k
            && self.gate == other.gate
            && self.capacity == other.capacity
            && self.losses == other.losses
            && self.shared_experts == other.shared_experts
            && self.balance_bias == other.balance_bias
    }
}

impl MoeConfig {
    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), MoeError> {
        check_nonzero("d_model", self.d_model)?;
        check_nonzero("num_experts", self.num_experts)?;
        check_nonzero("top_k", self.top_k)?;
        if self.top_k > self.num_experts {
            return Err(MoeError::TopKExceedsExperts {
                top_k: self.top_k,
                num_experts: self.num_experts,
            });
        }
        self.expert.validate()?;
        self.gate.validate(self.top_k)?;
        self.capacity.validate()?;
        self.losses.validate()?;
        if let Some(balance_bias) = &self.balance_bias {
            balance_bias.validate()?;
        }
        if self.gate.is_expert_choice() {
            if self.capacity.dropless {
                return Err(MoeError::NotForExpertChoice {
                    field: "capacity.dropless",
                    reason: "experts pick a fixed number of tokens, so nothing is ever dropped",
                });
            }
            if self.balance_bias.is_some() {
                return Err(MoeError::NotForExpertChoice {
                    field: "balance_bias",
                    reason: "every expert is exactly full by construction",
                });
            }
        }
        Ok(())
    }

    /// Validates the config and builds the layer on `device`.
    pub fn init(&self, device: &Device) -> Result<Moe, MoeError> {
        self.validate()?;
        let router = Router::init(
            self.d_model,
            self.num_experts,
            matches!(self.gate, GateConfig::Noisy(_)),
            self.balance_bias.is_some(),
            device,
        );
        let experts = self.expert.init(self.num_experts, self.d_model, device);
        let shared_experts = (self.shared_experts > 0).then(|| {
            ExpertConfig::new(self.shared_experts * self.expert.d_hidden)
                .with_kind(self.expert.kind)
                .init(1, self.d_model, device)
        });
        Ok(Moe {
            router,
            experts,
            shared_experts,
            config: self.clone(),
        })
    }

    /// Experts each token visits: `top_k` routed plus the shared ones (for expert choice, the
    /// average `capacity.train_factor`, rounded up).
    pub fn active_experts_per_token(&self) -> usize {
        let routed = if self.gate.is_expert_choice() {
            self.capacity.train_factor.ceil() as usize
        } else {
            self.top_k
        };
        routed + self.shared_experts
    }

    /// Parameters of the layer: router (with the noise weight and the balancing bias, when
    /// present), all experts and the shared experts. Equals Burn's `Module::num_params`.
    pub fn num_params(&self) -> usize {
        let per_expert = self.expert.params_per_expert(self.d_model);
        self.router_params() + (self.num_experts + self.shared_experts) * per_expert
            - self.shared_bias_overlap()
    }

    /// Parameters one token uses: the router, its `top_k` experts and the shared experts.
    pub fn num_active_params(&self) -> usize {
        let per_expert = self.expert.params_per_expert(self.d_model);
        self.router_params() + self.active_experts_per_token() * per_expert
            - self.shared_bias_overlap()
    }

    fn router_params(&self) -> usize {
        let weights = if matches!(self.gate, GateConfig::Noisy(_)) {
            2
        } else {
            1
        };
        let bias = if self.balance_bias.is_some() {
            self.num_experts
        } else {
            0
        };
        weights * self.d_model * self.num_experts + bias
    }

    /// The shared experts are stored as one wide expert with one output bias instead of
    /// `shared_experts` of them.
    fn shared_bias_overlap(&self) -> usize {
        match self.expert.kind {
            crate::ExpertKind::Ffn(_) if self.shared_experts > 1 => {
                (self.shared_experts - 1) * self.d_model
            }
            _ => 0,
        }
    }
}

/// A Mixture-of-Experts feed-forward layer: a gate sends each token to a few of `E` experts
/// and adds up their outputs, weighted by the gate.
///
/// `y = sum_{e in experts(x)} g_e(x) * expert_e(x) [+ shared(x)]`
///
/// Build it with [`MoeConfig::init`].
#[derive(Module, Debug)]
pub struct Moe {
    /// Router parameters.
    pub router: Router,
    /// The routed experts, stacked.
    pub experts: Experts,
    /// The shared experts (one wide expert), if any.
    pub shared_experts: Option<Experts>,
    #[module(skip)]
    config: MoeConfig,
}

/// Result of [`Moe::forward`].
#[derive(Debug, Clone)]
pub struct MoeOutput<const D: usize> {
    /// The layer output, same shape as the input.
    pub output: Tensor<D>,
    /// Weighted sum of the enabled auxiliary losses, `[1]`, in the autodiff graph: add it to the
    /// task loss to train the router.
    pub aux_loss: Tensor<1>,
    /// What the router did.
    pub stats: RoutingStats,
}

impl Moe {
    /// The config the layer was built from.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// Applies the layer to `x: [batch, seq, d_model]` or `[tokens, d_model]` (any rank >= 2;
    /// all leading dimensions are flattened into tokens). Routes as in training on an autodiff
    /// device and as in evaluation otherwise ([`RoutingMode::for_device`]).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> MoeOutput<D> {
        let mode = RoutingMode::for_device(&x.device());
        self.forward_with_mode(x, mode)
    }

    /// [`Moe::forward`] with the routing mode given explicitly.
    ///
    /// # Panics
    ///
    /// If the last dimension of `x` is not `d_model`.
    pub fn forward_with_mode<const D: usize>(
        &self,
        x: Tensor<D>,
        mode: RoutingMode,
    ) -> MoeOutput<D> {
        let shape = x.dims();
        let d_model = shape[D - 1];
        assert_eq!(
            d_model, self.config.d_model,
            "Moe::forward: the input's last dimension is {d_model}, the layer's d_model is {}",
            self.config.d_model
        );
        let num_tokens = shape[..D - 1].iter().product::<usize>();
        let order = TokenOrder::new(&shape);
        let tokens = order.flatten(x);

        let gate = self.config.gate.route(GateInput {
            x: tokens.clone(),
            router: &self.router,
            top_k: self.config.top_k,
            mode,
        });

        let (capacity, policy) = self.capacity_and_policy(&gate.candidates, num_tokens, mode);
        let plan = DispatchPlan::new(gate.candidates.clone(), gate.weights, capacity, policy);
        let expert_output = self.experts.forward_filled(
            plan.dispatch(tokens.clone()),
            plan.tokens_per_expert.clone(),
        );
        let mut output = plan.combine(expert_output, num_tokens);
        if let Some(shared) = &self.shared_experts {
            let shared_output = shared.forward(tokens.unsqueeze_dim(0)).squeeze_dim::<2>(0);
            output = output + shared_output;
        }

        // Auxiliary losses.
        let device = output.device();
        let mut aux_loss = Tensor::<1>::zeros([1], &device);
        let mut losses = Vec::new();
        if let Some(balance) = gate.balance_loss {
            aux_loss = aux_loss
                + balance
                    .clone()
                    .mul_scalar(self.config.losses.balance_weight);
            losses.push((LossKind::Balance, balance.detach()));
        }
        if self.config.losses.z_loss_weight > 0.0 {
            let z_loss = router_z_loss(gate.logits.clone());
            aux_loss = aux_loss + z_loss.clone().mul_scalar(self.config.losses.z_loss_weight);
            losses.push((LossKind::ZLoss, z_loss.detach()));
        }

        let kept = plan.kept.clone().int();
        let tokens_per_expert = plan.tokens_per_expert.clone();
        let routed_per_expert: Tensor<1, Int> = if self.config.gate.is_expert_choice() {
            tokens_per_expert.clone()
        } else {
            gate.candidates.int().sum_dim(0).squeeze_dim(0)
        };
        let dropped_assignments = (routed_per_expert.clone() - tokens_per_expert.clone()).sum();
        let unrouted_tokens = kept.sum_dim(1).equal_elem(0).int().sum();
        let stats = RoutingStats {
            assignments: order.restore_rows(plan.kept),
            routed_per_expert,
            tokens_per_expert,
            dropped_assignments,
            unrouted_tokens,
            mean_gate_prob: gate.probs.detach().mean_dim(0).squeeze_dim(0),
            losses,
            capacity,
            num_tokens,
        };
        MoeOutput {
            output: order.unflatten(output, shape),
            aux_loss,
            stats,
        }
    }

    /// Buffer slots per expert and the drop policy for this pass.
    fn capacity_and_policy(
        &self,
        candidates: &Tensor<2, Bool>,
        num_tokens: usize,
        mode: RoutingMode,
    ) -> (usize, DropPolicy) {
        let config = &self.config;
        if config.gate.is_expert_choice() {
            let capacity = config
                .capacity
                .capacity(num_tokens, config.num_experts, 1, mode);
            return (capacity, DropPolicy::Probability);
        }
        if config.capacity.dropless {
            // The busiest expert sizes the buffer: the one host read of the layer.
            let busiest: i64 = candidates
                .clone()
                .int()
                .sum_dim(0)
                .max()
                .into_scalar::<i64>();
            return (busiest.max(1) as usize, DropPolicy::Position);
        }
        let capacity = config
            .capacity
            .capacity(num_tokens, config.num_experts, config.top_k, mode);
        (capacity, config.capacity.drop_policy)
    }

    /// One step of auxiliary-loss-free balancing (see [`crate::balancing`]): moves the selection
    /// bias by `update_rate` towards the experts that received fewer than the mean number of
    /// assignments in `stats`. Does nothing when the layer has no balancing bias. Runs on the
    /// device, without reading anything back.
    pub fn update_balance_bias(&mut self, stats: &RoutingStats) {
        let (Some(settings), Some(bias)) = (&self.config.balance_bias, &self.router.selection_bias)
        else {
            return;
        };
        let load = stats.routed_per_expert.clone().float();
        let updated = updated_bias(bias.val().detach(), load, settings.update_rate);
        self.router.selection_bias =
            Some(Param::initialized(bias.id, updated).set_require_grad(false));
    }

    /// The selection bias of auxiliary-loss-free balancing, if enabled, `[E]`.
    pub fn balance_bias(&self) -> Option<Tensor<1>> {
        self.router.selection_bias.as_ref().map(|bias| bias.val())
    }
}

/// The order in which tokens compete for capacity: sequence position first, then batch row.
///
/// An input `[..., seq, d_model]` is flattened position-major (all first positions of the
/// batch, then all second positions, ...), so under [`DropPolicy::Position`] a token competes
/// only with tokens at the same or earlier positions: changing a later token of any sequence
/// never changes an earlier token's routing, which keeps decoders causal also in batches.
/// A `[tokens, d_model]` input keeps its order.
struct TokenOrder {
    batch: usize,
    seq: usize,
}

impl TokenOrder {
    fn new(shape: &[usize]) -> Self {
        let rank = shape.len();
        if rank >= 3 {
            Self {
                batch: shape[..rank - 2].iter().product(),
                seq: shape[rank - 2],
            }
        } else {
            Self {
                batch: 1,
                seq: shape[0],
            }
        }
    }

    /// Whether position-major order differs from the input's order (otherwise the
    /// transposes below are skipped: they would copy for nothing).
    fn reorders(&self) -> bool {
        self.batch > 1 && self.seq > 1
    }

    /// `[..., seq, d] -> [seq * batch, d]`, position-major.
    fn flatten<const D: usize>(&self, x: Tensor<D>) -> Tensor<2> {
        let d_model = x.dims()[D - 1];
        if !self.reorders() {
            return x.reshape([self.batch * self.seq, d_model]);
        }
        x.reshape([self.batch, self.seq, d_model])
            .swap_dims(0, 1)
            .reshape([self.seq * self.batch, d_model])
    }

    /// The inverse of [`flatten`](Self::flatten), back to `shape`.
    fn unflatten<const D: usize>(&self, y: Tensor<2>, shape: [usize; D]) -> Tensor<D> {
        let d_model = shape[D - 1];
        if !self.reorders() {
            return y.reshape(shape);
        }
        y.reshape([self.seq, self.batch, d_model])
            .swap_dims(0, 1)
            .reshape(shape)
    }

    /// Per-token rows `[seq * batch, E]` (position-major) back to the input's token order.
    fn restore_rows(&self, rows: Tensor<2, Bool>) -> Tensor<2, Bool> {
        if !self.reorders() {
            return rows;
        }
        let [_, columns] = rows.dims();
        rows.reshape([self.seq, self.batch, columns])
            .swap_dims(0, 1)
            .reshape([self.batch * self.seq, columns])
    }
}
