//! The report `moe-bench` writes (`--json FILE`): its rows, the typed key of each W1 row, and
//! the ratios computed from those keys. `tests/bench_smoke.rs` reads the report back with the
//! same types, so that a row is found by its key, never by a string written twice.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Tokens of W1's batch.
pub const TOKENS: usize = 4096;
/// W1's model width.
pub const D_MODEL: usize = 512;
/// W1's hidden size of one expert.
pub const D_HIDDEN: usize = 1024;

/// W1's two layers: the MoE layer, or the dense FFN with the same active width.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerForm {
    /// The MoE layer.
    Moe,
    /// The dense FFN of hidden size `top_k * D_HIDDEN`.
    Dense,
}

impl fmt::Display for LayerForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            LayerForm::Moe => "moe",
            LayerForm::Dense => "dense",
        })
    }
}

/// How many rows a W1 layer lets each expert take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Capacity {
    /// No limit: every routed row is computed (the ragged layout).
    #[serde(rename = "dropless")]
    Dropless,
    /// At most `ceil(1.25 * tokens * top_k / experts)` rows per expert.
    #[serde(rename = "capacity 1.25")]
    Factor125,
    /// Not an MoE layer (the dense FFN).
    #[serde(rename = "-")]
    Unlimited,
}

impl Capacity {
    /// The two limits W1 times each MoE configuration with.
    pub const LIMITS: [Capacity; 2] = [Capacity::Dropless, Capacity::Factor125];

    /// The label the tables and the JSON use.
    pub fn label(self) -> &'static str {
        match self {
            Capacity::Dropless => "dropless",
            Capacity::Factor125 => "capacity 1.25",
            Capacity::Unlimited => "-",
        }
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.label())
    }
}

/// What a W1 row measured: which layer, how many experts, how many per token, which limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerKey {
    /// MoE or dense.
    pub kind: LayerForm,
    /// Experts (1 for dense).
    pub experts: usize,
    /// Experts per token (the dense FFN has `top_k * D_HIDDEN` hidden units).
    pub top_k: usize,
    /// The limit on each expert's rows ([`Capacity::Unlimited`] for dense).
    pub capacity: Capacity,
}

impl LayerKey {
    /// The MoE layer with `experts` experts, `top_k` per token, under `capacity`.
    pub fn moe(experts: usize, top_k: usize, capacity: Capacity) -> Self {
        Self {
            kind: LayerForm::Moe,
            experts,
            top_k,
            capacity,
        }
    }

    /// The dense FFN with the active width of `top_k` experts.
    pub fn dense(top_k: usize) -> Self {
        Self {
            kind: LayerForm::Dense,
            experts: 1,
            top_k,
            capacity: Capacity::Unlimited,
        }
    }

    /// The name the ratios give it: `E8_top2_dropless`, `dense_hidden2048`.
    pub fn name(&self) -> String {
        match self.kind {
            LayerForm::Moe => format!("E{}_top{}_{}", self.experts, self.top_k, self.capacity),
            LayerForm::Dense => format!("dense_hidden{}", self.top_k * D_HIDDEN),
        }
    }
}

/// One measured W1 configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerRow {
    /// What it measured (its fields sit at the row's top level in JSON).
    #[serde(flatten)]
    pub key: LayerKey,
    /// Median seconds of forward + backward.
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_second: f64,
    /// Useful FLOPs (routed tokens only, no padding) per second, forward + backward.
    pub gflops: f64,
    /// Rows per expert of the expert buffer (MoE): the capacity `C`, or for dropless the
    /// mean load `tokens x top_k / E` (the ragged buffer holds exactly the routed rows).
    pub capacity_slots: usize,
}

/// The row of `rows` measured for `key`.
pub fn row_of(rows: &[LayerRow], key: LayerKey) -> Option<&LayerRow> {
    rows.iter().find(|row| row.key == key)
}

/// One W3 measurement: the backend's batched matmul.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MatmulRow {
    /// Batch (experts) of the batched matmul.
    pub batch: usize,
    /// Rows per batch entry.
    pub rows: usize,
    /// Inner size.
    pub inner: usize,
    /// Columns.
    pub columns: usize,
    /// Median seconds of one forward matmul.
    pub seconds: f64,
    /// Achieved GFLOP/s.
    pub gflops: f64,
}

/// One measured W2 configuration: a training step of a preset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRow {
    /// Preset name.
    pub preset: String,
    /// Total parameters.
    pub parameters: usize,
    /// Active parameters per token.
    pub active_parameters: usize,
    /// Tokens per step.
    pub tokens: usize,
    /// Median seconds of one step (forward, backward, AdamW update).
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_second: f64,
    /// Peak resident memory of a process that only ran this, bytes (`None`: not measured).
    pub peak_rss: Option<u64>,
    /// Resident memory of that process before building the model, bytes.
    pub baseline_rss: Option<u64>,
    /// Hand estimate of what training needs, bytes (moe-bench's `step::estimate_bytes`).
    pub estimated_bytes: u64,
    /// Kernel launches of one step, on wgpu (`None`: not counted).
    #[serde(default)]
    pub launches_per_step: Option<usize>,
    /// Reads from the device to the host during one step, on wgpu (`None`: not counted).
    #[serde(default)]
    pub host_reads_per_step: Option<usize>,
}

/// How `bench/torch_moe.py` holds a W1 configuration's experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TorchForm {
    /// An `nn.ModuleList` of per-expert `nn.Linear`s, looped over (FastMoE's form).
    Loop,
    /// Rows sorted by expert, then one product per expert's slice.
    Sorted,
    /// The dense FFN.
    Dense,
}

impl fmt::Display for TorchForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            TorchForm::Loop => "loop",
            TorchForm::Sorted => "sorted",
            TorchForm::Dense => "dense",
        })
    }
}

/// One of W1's configurations as the PyTorch script names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TorchCase {
    /// How the experts are held.
    pub form: TorchForm,
    /// Experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// The limit on each expert's rows.
    pub capacity: Capacity,
}

impl TorchCase {
    /// Whether this measures the same layer as our row `key` (any form of the MoE layer).
    pub fn measures(&self, key: LayerKey) -> bool {
        let dense = self.form == TorchForm::Dense;
        match key.kind {
            LayerForm::Dense => dense && self.top_k == key.top_k,
            LayerForm::Moe => {
                !dense
                    && (self.experts, self.top_k, self.capacity)
                        == (key.experts, key.top_k, key.capacity)
            }
        }
    }
}

/// One PyTorch W1 row: a configuration and its median time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TorchLayerRow {
    /// The configuration (its fields sit at the row's top level in JSON).
    #[serde(flatten)]
    pub case: TorchCase,
    /// Median seconds.
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_second: f64,
}

/// One PyTorch W2 row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TorchStepRow {
    /// Preset.
    pub preset: String,
    /// Median seconds per step.
    pub seconds: f64,
    /// Tokens per second.
    pub tokens_per_second: f64,
    /// Parameters of the PyTorch model.
    pub parameters: usize,
}

/// PyTorch's side of the benchmark (W4).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TorchResults {
    /// torch version.
    pub torch: String,
    /// Threads torch used.
    pub threads: usize,
    /// W1 rows.
    pub w1: Vec<TorchLayerRow>,
    /// W2 rows.
    pub w2: Vec<TorchStepRow>,
}

/// W4 as the report holds it: PyTorch's results, or why they were not measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TorchSide {
    /// Measured.
    Measured(TorchResults),
    /// Not measured, and why.
    NotMeasured {
        /// Why (`--no-torch`, no Python with torch, the script stopped).
        not_measured: String,
    },
}

/// The ratios of the main run, each named by the key of its row ([`LayerKey::name`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ratios {
    /// P1: the MoE layer's tokens/s over the dense FFN's at E=8 (target >= 0.90 at top-2).
    pub p1_moe_efficiency: BTreeMap<String, f64>,
    /// P2: seconds at E=64 over seconds at E=4 (target <= 1.10).
    pub p2_expert_scaling: BTreeMap<String, f64>,
    /// P3: our tokens/s over PyTorch's best form of the same configuration, `W1_<key>` and
    /// `W2_<preset>` (target >= 1.0).
    pub p3_vs_pytorch: BTreeMap<String, f64>,
    /// P4: the E=8 top-2 layer's GFLOP/s over the backend's matmul at its expert buffer's
    /// shape (target >= 0.80).
    pub p4_gemm_efficiency: BTreeMap<String, f64>,
    /// W2's peak resident memory over the hand estimate plus the process's baseline (target
    /// <= 1.5).
    pub peak_rss_ratio: BTreeMap<String, f64>,
}

impl Ratios {
    /// The ratios of the rows measured, each looked up by its key.
    pub fn of(
        w1: &[LayerRow],
        w2: &[StepRow],
        w3: &[MatmulRow],
        torch: Option<&TorchResults>,
    ) -> Self {
        let mut ratios = Ratios::default();
        for capacity in Capacity::LIMITS {
            for top_k in [1, 2] {
                let moe = LayerKey::moe(8, top_k, capacity);
                if let (Some(moe), Some(dense)) =
                    (row_of(w1, moe), row_of(w1, LayerKey::dense(top_k)))
                {
                    let ratio = moe.tokens_per_second / dense.tokens_per_second;
                    ratios
                        .p1_moe_efficiency
                        .insert(moe.key.name(), round(ratio));
                }
                let (big, small) = (
                    LayerKey::moe(64, top_k, capacity),
                    LayerKey::moe(4, top_k, capacity),
                );
                if let (Some(big), Some(small)) = (row_of(w1, big), row_of(w1, small)) {
                    let name = format!("top{top_k}_{capacity}");
                    ratios
                        .p2_expert_scaling
                        .insert(name, round(big.seconds / small.seconds));
                }
            }
            if let Some(moe) = row_of(w1, LayerKey::moe(8, 2, capacity)) {
                let same_shape = |m: &&MatmulRow| m.batch == 8 && m.rows == moe.capacity_slots;
                if let Some(gemm) = w3.iter().find(same_shape) {
                    let ratio = moe.gflops / gemm.gflops;
                    ratios
                        .p4_gemm_efficiency
                        .insert(moe.key.name(), round(ratio));
                }
            }
        }
        if let Some(torch) = torch {
            ratios.add_pytorch(w1, w2, torch);
        }
        for row in w2 {
            if let (Some(peak), Some(baseline)) = (row.peak_rss, row.baseline_rss) {
                let ratio = peak as f64 / (row.estimated_bytes + baseline) as f64;
                ratios
                    .peak_rss_ratio
                    .insert(row.preset.clone(), round(ratio));
            }
        }
        ratios
    }

    /// P3: each of our rows over PyTorch's fastest form of the same configuration.
    fn add_pytorch(&mut self, w1: &[LayerRow], w2: &[StepRow], torch: &TorchResults) {
        for row in w1 {
            let best = torch
                .w1
                .iter()
                .filter(|t| t.case.measures(row.key))
                .map(|t| t.tokens_per_second)
                .fold(0.0, f64::max);
            if best > 0.0 {
                let name = format!("W1_{}", row.key.name());
                self.p3_vs_pytorch
                    .insert(name, round(row.tokens_per_second / best));
            }
        }
        for row in w2 {
            if let Some(t) = torch.w2.iter().find(|t| t.preset == row.preset) {
                let name = format!("W2_{}", row.preset);
                self.p3_vs_pytorch
                    .insert(name, round(row.tokens_per_second / t.tokens_per_second));
            }
        }
    }
}

/// The report of a full `moe-bench` run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The backend and device measured.
    pub backend: String,
    /// Threads available.
    pub threads: usize,
    /// Whether the allocator's heap reuse was on.
    pub heap_reuse: bool,
    /// Whether the work ran on a compute thread (not the main thread).
    pub on_compute_thread: bool,
    /// `--quick`: one repetition, fewer shapes.
    pub quick: bool,
    /// W1: the MoE layer against the dense FFN.
    pub w1: Vec<LayerRow>,
    /// W2: a training step of the presets.
    pub w2: Vec<StepRow>,
    /// W3: the backend's matmul at the expert shapes.
    pub w3: Vec<MatmulRow>,
    /// W4: PyTorch eager at W1's and W2's shapes.
    pub w4: TorchSide,
    /// W5: the layer's cost as tokens and experts grow (moe-bench's `scaling` rows).
    pub w5: serde_json::Value,
    /// W6: finer experts at equal active width (moe-bench's `granularity` rows).
    pub w6: serde_json::Value,
    /// W7: the grouped expert matmul against the backend's matmul (moe-bench's `grouped`
    /// rows).
    pub w7: serde_json::Value,
    /// The ratios of W1-W4 (their fields sit at the report's top level in JSON).
    #[serde(flatten)]
    pub ratios: Ratios,
}

/// `value` to three decimals, as the report gives ratios.
pub fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
