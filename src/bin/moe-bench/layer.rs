//! W1 (the MoE layer and the dense FFN with the same active FLOPs, forward + backward) and W3
//! (the backend's own matmul at the expert GEMM shapes).

use std::cell::Cell;
use std::rc::Rc;

use burn::tensor::{Device, Distribution, Tensor};
use burn_moe::bench::{Capacity, LayerKey, LayerRow, MatmulRow};
pub use burn_moe::bench::{D_HIDDEN, D_MODEL, TOKENS};
use burn_moe::core::{
    Activation, CapacityConfig, ExpertConfig, ExpertKind, GateConfig, LossConfig, MoeConfig,
    RoutingMode,
};

/// FLOPs of the expert (or dense FFN) matmuls for `tokens * top_k` routed rows, forward and
/// backward: two matmuls, each `2 * rows * d * h` forward and twice that backward.
pub fn ffn_flops(rows: usize, d: usize, h: usize) -> f64 {
    3.0 * 2.0 * 2.0 * rows as f64 * d as f64 * h as f64
}

/// W1's MoE layer: softmax top-k gate, GELU FFN experts, no auxiliary loss weights, dropless or
/// capacity factor 1.25.
pub fn moe_config(experts: usize, top_k: usize, dropless: bool) -> MoeConfig {
    benchmark_layer(D_MODEL, D_HIDDEN, experts, top_k, dropless)
}

/// The MoE layer the benchmark's workloads time, at any width: softmax top-k gate, GELU FFN
/// experts of hidden size `d_hidden`, no auxiliary loss weights, dropless or capacity factor
/// 1.25.
pub fn benchmark_layer(
    d_model: usize,
    d_hidden: usize,
    experts: usize,
    top_k: usize,
    dropless: bool,
) -> MoeConfig {
    let capacity = if dropless {
        CapacityConfig::dropless()
    } else {
        CapacityConfig::new()
            .with_train_factor(1.25)
            .with_min_capacity(1)
    };
    MoeConfig::new(
        d_model,
        experts,
        ExpertConfig::new(d_hidden).with_kind(ExpertKind::Ffn(Activation::Gelu)),
    )
    .with_top_k(top_k)
    .with_gate(GateConfig::softmax_top_k())
    .with_capacity(capacity)
    .with_losses(LossConfig::new())
}

/// One W1 configuration being timed: what its row will say besides the time.
pub struct LayerCase {
    /// What it measures.
    pub key: LayerKey,
    /// Rows per expert of the expert buffer (see [`LayerRow::capacity_slots`]; set by the
    /// pass itself under a capacity limit).
    slots: Rc<Cell<usize>>,
}

impl LayerCase {
    /// Rows per expert of the expert buffer (0 before the first pass under a capacity limit).
    pub fn slots(&self) -> usize {
        self.slots.get()
    }
}

/// One forward + backward pass of a W1 configuration.
pub type LayerRun = Box<dyn FnMut()>;

impl LayerCase {
    /// The row of this configuration, given the median seconds of its pass.
    pub fn row(&self, seconds: f64) -> LayerRow {
        LayerRow {
            key: self.key,
            seconds,
            tokens_per_second: TOKENS as f64 / seconds,
            // The dense FFN's hidden `top_k * D_HIDDEN` gives the same count.
            gflops: ffn_flops(TOKENS * self.key.top_k, D_MODEL, D_HIDDEN) / seconds / 1e9,
            capacity_slots: self.slots.get(),
        }
    }
}

/// W1 for one MoE configuration on `device` (autodiff is added here): the case and its pass.
pub fn moe_case(
    device: &Device,
    experts: usize,
    top_k: usize,
    dropless: bool,
) -> (LayerCase, LayerRun) {
    let device = device.clone().autodiff();
    device.seed(1);
    let moe = moe_config(experts, top_k, dropless)
        .init(&device)
        .expect("valid config");
    let x = Tensor::<2>::random([TOKENS, D_MODEL], Distribution::Normal(0.0, 1.0), &device);
    let mean_load = (TOKENS * top_k).div_ceil(experts);
    let slots = Rc::new(Cell::new(if dropless { mean_load } else { 0 }));
    let capacity = if dropless {
        Capacity::Dropless
    } else {
        Capacity::Factor125
    };
    let case = LayerCase {
        key: LayerKey::moe(experts, top_k, capacity),
        slots: slots.clone(),
    };
    let run = Box::new(move || {
        let x = x.clone().detach().require_grad();
        let out = moe.forward_with_mode(x, RoutingMode::Train);
        if !dropless {
            slots.set(out.stats.capacity);
        }
        let loss = out.output.mean() + out.aux_loss;
        let _ = loss.backward();
    });
    (case, run)
}

/// W1's baseline: the dense FFN with `top_k * 1024` hidden units (the same active FLOPs).
pub fn dense_case(device: &Device, top_k: usize) -> (LayerCase, LayerRun) {
    let device = device.clone().autodiff();
    device.seed(1);
    let ffn = ExpertConfig::new(top_k * D_HIDDEN)
        .with_kind(ExpertKind::Ffn(Activation::Gelu))
        .init(1, D_MODEL, &device);
    let x = Tensor::<3>::random(
        [1, TOKENS, D_MODEL],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let case = LayerCase {
        key: LayerKey::dense(top_k),
        slots: Rc::new(Cell::new(TOKENS)),
    };
    let run = Box::new(move || {
        let x = x.clone().detach().require_grad();
        let loss = ffn.forward(x).mean();
        let _ = loss.backward();
    });
    (case, run)
}

/// One W3 product being timed: its shape, for the row.
pub struct MatmulCase {
    batch: usize,
    rows: usize,
    inner: usize,
    columns: usize,
}

impl MatmulCase {
    /// The row of this product, given the median seconds of one run.
    pub fn row(&self, seconds: f64) -> MatmulRow {
        let Self {
            batch,
            rows,
            inner,
            columns,
        } = *self;
        MatmulRow {
            batch,
            rows,
            inner,
            columns,
            seconds,
            gflops: 2.0 * (batch * rows * inner * columns) as f64 / seconds / 1e9,
        }
    }
}

/// W3: `[batch, rows, inner] x [batch, inner, columns]`, forward only: the case and one run.
pub fn matmul_case(
    device: &Device,
    batch: usize,
    rows: usize,
    inner: usize,
    columns: usize,
) -> (MatmulCase, LayerRun) {
    let a = Tensor::<3>::random([batch, rows, inner], Distribution::Normal(0.0, 1.0), device);
    let b = Tensor::<3>::random(
        [batch, inner, columns],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let run = Box::new(move || {
        // Read one element back so that lazy backends really run the product.
        let product = a.clone().matmul(b.clone());
        let _ = product.slice([0..1, 0..1, 0..1]).into_data();
    });
    let case = MatmulCase {
        batch,
        rows,
        inner,
        columns,
    };
    (case, run)
}
