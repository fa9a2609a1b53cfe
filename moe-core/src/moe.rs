//! The Mixture-of-Experts layer: config, module and forward pass.

use burn::config::Config;
use burn::module::{Module, Param, ParamId};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use crate::balancing::{updated_bias, BiasBalancingConfig};
use crate::dispatch::DispatchPlan;
use crate::error::{check_nonzero, check_positive, MoeError};
use crate::gate::{CustomGate, Gate, GateConfig, GateInput};
use crate::init::uniform;
use crate::lora::{LoraConfig, LoraTarget};
use crate::losses::{router_z_loss, LossConfig, LossKind};
use crate::placement::{ExpertPlacement, ShardedParam};
use crate::precision::{param_for, to_dtype};
use crate::stats::RoutingRecord;
use crate::token_order::TokenOrder;
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
#[derive(Config, Debug, PartialEq)]
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
    /// Factor `s` on the routed experts' weighted sum, `y = s * sum_j g_j E_j(x)` (DeepSeek-V2
    /// and V3's `routed_scaling_factor`); 1 for none. With `k` experts per token and weights
    /// that sum to one, each expert's output reaches the layer's output scaled by about
    /// `1/k`, so under Adam (whose steps do not grow with the gradient) the experts' function
    /// changes about `k` times slower than a dense FFN's at the same learning rate; `s > 1`
    /// speeds it up. On the `tiny` preset (64 experts, top-16) `s` = 4 and 16 trained worse
    /// than 1 (BENCHMARKS.md), so the presets leave it at 1.
    #[config(default = 1.0)]
    pub routed_scale: f64,
    /// Hidden width of the shared-expert block when it is not `shared_experts *
    /// expert.d_hidden` (Qwen2-MoE's `shared_expert_intermediate_size`); `None` for that
    /// product.
    pub shared_d_hidden: Option<usize>,
    /// Scale the shared experts' output by a learned sigmoid gate, `sigmoid(x w_s) * shared(x)`
    /// with `w_s: [d_model, 1]` (Qwen2-MoE's `shared_expert_gate`), so that each token decides
    /// how much of the always-on block it takes.
    #[config(default = false)]
    pub shared_gate: bool,
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
        check_positive("routed_scale", self.routed_scale)?;
        if self.shared_experts == 0 && (self.shared_d_hidden.is_some() || self.shared_gate) {
            return Err(MoeError::NeedsSharedExperts {
                field: if self.shared_gate {
                    "shared_gate"
                } else {
                    "shared_d_hidden"
                },
            });
        }
        if let Some(width) = self.shared_d_hidden {
            check_nonzero("shared_d_hidden", width)?;
        }
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
        let shared_experts = self
            .shared_block()
            .map(|block| block.init(1, self.d_model, device));
        let shared_gate = self
            .shared_gate
            .then(|| uniform([self.d_model, 1], self.d_model, device));
        Ok(Moe {
            router,
            experts,
            placed_experts: Vec::new(),
            shared_experts,
            shared_gate,
            custom_gate: None,
            config: self.clone(),
            placement: None,
            gathered_ids: Vec::new(),
        })
    }

    /// Hidden width of the shared-expert block: `shared_d_hidden`, or `shared_experts *
    /// expert.d_hidden` (0 without shared experts).
    pub fn shared_width(&self) -> usize {
        if self.shared_experts == 0 {
            return 0;
        }
        self.shared_d_hidden
            .unwrap_or(self.shared_experts * self.expert.d_hidden)
    }

    /// Expert hidden units one token passes through: `top_k * expert.d_hidden` routed (for
    /// expert choice, the average `capacity.train_factor` experts, rounded up) plus the shared
    /// block's width. The width of the dense FFN with the same active parameters.
    pub fn active_width(&self) -> usize {
        let routed = self.active_experts_per_token() - self.shared_experts;
        routed * self.expert.d_hidden + self.shared_width()
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
        self.router_params() + self.num_experts * per_expert + self.shared_params()
    }

    /// Parameters one token uses: the router, its `top_k` experts and the shared experts.
    pub fn num_active_params(&self) -> usize {
        let per_expert = self.expert.params_per_expert(self.d_model);
        let routed = self.active_experts_per_token() - self.shared_experts;
        self.router_params() + routed * per_expert + self.shared_params()
    }

    /// The shared-expert block (one expert of [`MoeConfig::shared_width`]) and its gate.
    fn shared_params(&self) -> usize {
        let Some(block) = self.shared_block() else {
            return 0;
        };
        let gate = if self.shared_gate { self.d_model } else { 0 };
        block.params_per_expert(self.d_model) + gate
    }

    /// The shared-expert block: one expert of [`MoeConfig::shared_width`] in the routed
    /// experts' form; `None` without shared experts.
    fn shared_block(&self) -> Option<ExpertConfig> {
        (self.shared_experts > 0)
            .then(|| ExpertConfig::new(self.shared_width()).with_kind(self.expert.kind))
    }

    /// Router weight matrices `[d_model, E]`: the router's, and the noisy gate's noise weight.
    fn router_weights(&self) -> usize {
        if matches!(self.gate, GateConfig::Noisy(_)) {
            2
        } else {
            1
        }
    }

    /// Parameters of the LoRA adapters `lora` attaches to the layer ([`crate::lora`]): the
    /// router's weights and the shared gate (target `Router`), every routed and shared expert
    /// (target `Experts`).
    pub fn lora_params(&self, lora: &LoraConfig) -> usize {
        let (d, r) = (self.d_model, lora.rank);
        let mut total = 0;
        if lora.targets.contains(&LoraTarget::Router) {
            let gate = if self.shared_experts > 0 && self.shared_gate {
                r * (d + 1)
            } else {
                0
            };
            total += self.router_weights() * r * (d + self.num_experts) + gate;
        }
        if lora.targets.contains(&LoraTarget::Experts) {
            total += self.num_experts * self.expert.lora_params_per_expert(d, r);
            if let Some(block) = self.shared_block() {
                total += block.lora_params_per_expert(d, r);
            }
        }
        total
    }

    fn router_params(&self) -> usize {
        let bias = if self.balance_bias.is_some() {
            self.num_experts
        } else {
            0
        };
        self.router_weights() * self.d_model * self.num_experts + bias
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
    /// The routed experts, stacked; under an expert placement ([`Moe::with_placement`]), those
    /// of its first device.
    pub experts: Experts,
    /// Under an expert placement, the experts of its other devices, in expert order; empty
    /// otherwise.
    pub placed_experts: Vec<Experts>,
    /// The shared experts (one wide expert), if any.
    pub shared_experts: Option<Experts>,
    /// The shared experts' sigmoid gate `w_s`, `[d_model, 1]` (see [`MoeConfig::shared_gate`]).
    pub shared_gate: Option<Param<Tensor<2>>>,
    /// A routing function of the user's own that replaces `config.gate` ([`Moe::with_gate`]).
    #[module(skip)]
    custom_gate: Option<CustomGate>,
    #[module(skip)]
    config: MoeConfig,
    /// Which device holds which experts, when they are spread over several.
    #[module(skip)]
    placement: Option<ExpertPlacement>,
    /// Under a placement, the ids the stacked experts' parameters had before it (and take
    /// back when gathered), in [`Experts::param_ids`]'s order.
    #[module(skip)]
    gathered_ids: Vec<ParamId>,
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

    /// The layer routing with `gate`, a routing function of the user's own ([`Gate`]),
    /// instead of `config.gate`; dispatch, capacity (with `config.top_k` as the experts per
    /// token), the losses and the statistics stay the layer's. The gate is not part of the
    /// record: a loaded model routes with its config's gate until it is set again.
    pub fn with_gate(mut self, gate: impl Gate + 'static) -> Self {
        self.custom_gate = Some(CustomGate(std::sync::Arc::new(gate)));
        self
    }

    /// The layer with its experts spread over devices as `placement` says (expert
    /// parallelism, [`crate::placement`]): each device's experts move there, as parameters of
    /// their own; the router and the shared experts stay. The forward pass sends each device
    /// the rows of the tokens routed to its experts and brings their outputs back, and the
    /// gradients flow back the same way; the result is the layer's on one device. Save the
    /// layer [`Moe::gathered`]: a record does not say where an expert lived.
    ///
    /// Refuses a placement of another number of experts, and experts with LoRA adapters.
    pub fn with_placement(self, placement: ExpertPlacement) -> Result<Self, MoeError> {
        if placement.num_experts() != self.config.num_experts {
            return Err(MoeError::Placement(format!(
                "the placement holds {} experts, the layer has {}",
                placement.num_experts(),
                self.config.num_experts
            )));
        }
        let mut layer = self.gathered();
        if crate::lora::adapter_count(&layer.experts) > 0 {
            return Err(MoeError::Placement(
                "experts with LoRA adapters cannot be placed on devices yet: merge the adapters first"
                    .into(),
            ));
        }
        let mut shards = placement
            .ranges()
            .iter()
            .zip(placement.devices())
            .map(|(range, device)| layer.experts.slice_to(range.clone(), device));
        let first = shards.next().expect("a placement has a device");
        layer.placed_experts = shards.collect();
        layer.gathered_ids = std::mem::replace(&mut layer.experts, first).param_ids();
        layer.placement = Some(placement);
        Ok(layer)
    }

    /// The layer with every expert back in one stack on the router's device (itself when no
    /// placement spreads them): the form to save or to place again.
    pub fn gathered(mut self) -> Self {
        if self.placement.take().is_none() {
            return self;
        }
        let home = self.router.weight.device();
        let mut shards = vec![self.experts];
        shards.append(&mut self.placed_experts);
        self.experts = Experts::concat(&shards, &home).with_param_ids(&self.gathered_ids);
        self.gathered_ids.clear();
        self
    }

    /// Where the experts are, when a placement spreads them over devices.
    pub fn placement(&self) -> Option<&ExpertPlacement> {
        self.placement.as_ref()
    }

    /// Each parameter of the placed experts as the placement splits it: the gathered id and
    /// the shards' (empty without a placement).
    pub fn sharded_params(&self) -> Vec<ShardedParam> {
        let Some(placement) = &self.placement else {
            return Vec::new();
        };
        let shard_ids: Vec<Vec<ParamId>> = std::iter::once(&self.experts)
            .chain(&self.placed_experts)
            .map(Experts::param_ids)
            .collect();
        self.gathered_ids
            .iter()
            .enumerate()
            .map(|(k, &gathered)| ShardedParam {
                gathered,
                shards: shard_ids
                    .iter()
                    .zip(placement.ranges())
                    .map(|(ids, range)| (ids[k], range.clone()))
                    .collect(),
            })
            .collect()
    }

    /// The layer on `device` as a data-parallel replica: the router and the shared experts
    /// moved there *in the autodiff graph* (their gradients flow back to this layer's
    /// parameters, so the replicas' gradients add up there); placed experts stay on their
    /// devices, shared by every replica, and experts without a placement move like the rest.
    pub fn replica_on(&self, device: &Device) -> Self {
        self.replica(device, ReplicaWeights::Linked)
    }

    /// The layer on `device` as a data-parallel replica that keeps weights of its own: the
    /// router, the shared experts and experts without a placement copied there as new leaves of
    /// the autodiff graph ([`Module::fork`]: same parameter ids, gradients of their own, to be
    /// reduced with the other replicas'); placed experts stay on their devices, shared by every
    /// replica, their gradients adding up there. After the placed experts are updated, give
    /// the replica the new ones with [`Moe::share_placed_experts`].
    pub fn replica_with_own_weights_on(&self, device: &Device) -> Self {
        self.replica(device, ReplicaWeights::Own)
    }

    fn replica(&self, device: &Device, weights: ReplicaWeights) -> Self {
        let placed = self.placement.is_some();
        let experts = match placed {
            true => self.experts.clone(),
            false => weights.carry(self.experts.clone(), device),
        };
        Moe {
            router: weights.carry(self.router.clone(), device),
            experts,
            placed_experts: self.placed_experts.clone(),
            shared_experts: self
                .shared_experts
                .clone()
                .map(|experts| weights.carry(experts, device)),
            shared_gate: self
                .shared_gate
                .clone()
                .map(|gate| weights.carry(gate, device)),
            custom_gate: self.custom_gate.clone(),
            config: self.config.clone(),
            placement: self.placement.clone(),
            gathered_ids: self.gathered_ids.clone(),
        }
    }

    /// Takes `from`'s placed experts (the same tensors, on their devices) in place of this
    /// replica's, when both layers have a placement; otherwise nothing changes. A replica made
    /// by [`Moe::replica_with_own_weights_on`] shares the placed experts of the layer it was
    /// made from, and needs their new values after each update of them.
    pub fn share_placed_experts(&mut self, from: &Moe) {
        if self.placement.is_some() && from.placement.is_some() {
            self.experts = from.experts.clone();
            self.placed_experts = from.placed_experts.clone();
        }
    }

    /// The routed experts on the expert buffer `[S, d_model]` (see [`crate::dispatch`]). Under
    /// a placement, each device's contiguous run of rows travels to it in one transfer, its
    /// experts run there, and the outputs come back in order, followed by the padding rows'
    /// zeros. Where the runs start is read from the device once per call (the expert loads;
    /// FastMoE's all-to-all exchanges the same counts first).
    fn run_experts(&self, buffer: Tensor<2>, plan: &DispatchPlan) -> Tensor<2> {
        let Some(placement) = &self.placement else {
            return self.experts.forward_grouped(buffer, plan.offsets.clone());
        };
        let home = buffer.device();
        let slots = buffer.dims()[0];
        let offsets: Vec<i64> = plan
            .offsets
            .clone()
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .expect("offsets read back as integers");
        let shards = std::iter::once(&self.experts).chain(&self.placed_experts);
        let mut pieces = Vec::new();
        // Each shard's own device: the placement's, or its inner device in evaluation
        // (`Module::valid` moves the shards there).
        for (range, shard) in placement.ranges().iter().zip(shards) {
            let device = &shard.w_in.val().device();
            let (start, end) = (offsets[range.start] as usize, offsets[range.end] as usize);
            if start == end {
                continue;
            }
            let rows = buffer.clone().slice(start..end).to_device(device);
            let local: Vec<i64> = offsets[range.start..=range.end]
                .iter()
                .map(|offset| offset - start as i64)
                .collect();
            let local =
                Tensor::<1, Int>::from_data(TensorData::new(local, [range.len() + 1]), device);
            pieces.push(shard.forward_grouped(rows, local).to_device(&home));
        }
        let routed = offsets[offsets.len() - 1] as usize;
        if routed < slots || pieces.is_empty() {
            pieces.push(buffer.slice(routed..slots).zeros_like());
        }
        Tensor::cat(pieces, 0)
    }

    /// The user's gate, if one replaced the config's ([`Moe::with_gate`]).
    pub fn custom_gate(&self) -> Option<&dyn Gate> {
        self.custom_gate.as_ref().map(|gate| gate.0.as_ref())
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

        // The router computes in its weights' precision (f32 under mixed precision), as
        // Switch Transformer does: its softmax and top-k decide the routing, so round-off there
        // changes which experts a token visits.
        let input = GateInput {
            x: to_dtype(tokens.clone(), self.router.weight.base().dtype()),
            router: &self.router,
            top_k: self.config.top_k,
            mode,
        };
        let gate = match &self.custom_gate {
            Some(custom) => custom.0.route(input),
            None => self.config.gate.route(input),
        };

        let (plan, capacity) = self.plan(&gate.candidates, gate.weights, num_tokens, mode);
        let expert_output = self.run_experts(plan.dispatch(tokens.clone()), &plan);
        let mut output = plan.combine(expert_output, num_tokens);
        if self.config.routed_scale != 1.0 {
            output = output.mul_scalar(self.config.routed_scale);
        }
        if let Some(shared) = &self.shared_experts {
            let mut shared_output = shared
                .forward(tokens.clone().unsqueeze_dim(0))
                .squeeze_dim::<2>(0);
            if let Some(gate) = &self.shared_gate {
                let weight = param_for(gate, &tokens);
                shared_output = shared_output * sigmoid(tokens.matmul(weight));
            }
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

        let stats = RoutingStats::new(RoutingRecord {
            kept: plan.kept,
            candidates: gate.candidates,
            probs: gate.probs,
            order,
            expert_choice: self.config.gate.is_expert_choice(),
            tokens_per_expert: plan.tokens_per_expert,
            losses,
            capacity,
            num_tokens,
        });
        MoeOutput {
            output: order.unflatten(output, shape),
            aux_loss,
            stats,
        }
    }

    /// The dispatch plan of this pass, with the most assignments one expert may keep.
    ///
    /// Under a capacity limit the buffer has `E x C` rows; dropless, it has one row for every
    /// assignment the gate can make (`tokens x top_k`), so its size is known before routing and
    /// nothing is read back from the device, and an expert may take every token.
    fn plan(
        &self,
        candidates: &Tensor<2, Bool>,
        weights: Tensor<2>,
        num_tokens: usize,
        mode: RoutingMode,
    ) -> (DispatchPlan, usize) {
        let config = &self.config;
        let candidates = candidates.clone();
        if config.gate.is_expert_choice() {
            let capacity = config
                .capacity
                .capacity(num_tokens, config.num_experts, 1, mode);
            let plan =
                DispatchPlan::with_capacity(candidates, weights, capacity, DropPolicy::Probability);
            return (plan, capacity);
        }
        if config.capacity.dropless {
            let slots = num_tokens * config.top_k;
            return (
                DispatchPlan::dropless(candidates, weights, slots),
                num_tokens,
            );
        }
        let capacity = config
            .capacity
            .capacity(num_tokens, config.num_experts, config.top_k, mode);
        let plan =
            DispatchPlan::with_capacity(candidates, weights, capacity, config.capacity.drop_policy);
        (plan, capacity)
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
        let load = stats.routed_per_expert().float();
        let updated = updated_bias(bias.val().detach(), load, settings.update_rate);
        self.router.selection_bias =
            Some(Param::initialized(bias.id, updated).set_require_grad(false));
    }

    /// The selection bias of auxiliary-loss-free balancing, if enabled, `[E]`.
    pub fn balance_bias(&self) -> Option<Tensor<1>> {
        self.router.selection_bias.as_ref().map(|bias| bias.val())
    }
}

/// How a data-parallel replica holds the weights it does not share.
#[derive(Clone, Copy)]
enum ReplicaWeights {
    /// Moved in the autodiff graph: gradients flow back to the original's parameters.
    Linked,
    /// Copied as leaves of their own ([`Module::fork`]).
    Own,
}

impl ReplicaWeights {
    fn carry<M: Module>(self, module: M, device: &Device) -> M {
        match self {
            ReplicaWeights::Linked => module.to_device(device),
            ReplicaWeights::Own => module.fork(device),
        }
    }
}
