//! Expert parallelism: the experts of a layer spread over several devices.
//!
//! FastMoE (He et al. 2021) and GShard (Lepikhin et al. 2020) train a layer whose experts do not
//! fit one device by giving each device some of them: the tokens routed to an expert travel to
//! its device, are computed there, and come back (the all-to-all exchange); the gradient flows
//! back the same way. An [`ExpertPlacement`] says which device holds which experts: contiguous
//! ranges, one per device, so that the tokens a device receives are one contiguous run of the
//! layer's expert buffer (see [`crate::dispatch`]), which travels as one transfer.
//!
//! The placement is data, not a branch: [`crate::Moe::with_placement`] moves each range of the
//! stacked experts to its device, and the layer's forward pass sends each range its rows with
//! `Tensor::to_device`, which Burn's autodiff follows (its backward pass returns the gradient
//! to the sending device). The router, the shared experts and everything outside the layer stay
//! on the layer's own device. [`crate::Moe::gathered`] brings the experts back into one stack,
//! the form that is saved: a record never says where an expert lived.

use std::ops::Range;

use burn::module::ParamId;
use burn::tensor::Device;

use crate::error::MoeError;

/// Which device holds each expert of a layer: device `i` holds the experts `ranges[i]`,
/// consecutive ranges covering `0..num_experts` in order.
#[derive(Debug, Clone)]
pub struct ExpertPlacement {
    devices: Vec<Device>,
    ranges: Vec<Range<usize>>,
}

impl ExpertPlacement {
    /// `num_experts` experts shared out over `devices` as evenly as they go, the first
    /// `num_experts % devices` devices holding one more (FastMoE's layout: worker `i` holds
    /// experts `i * E / N ..`).
    pub fn even(num_experts: usize, devices: Vec<Device>) -> Result<Self, MoeError> {
        let n = devices.len();
        if n == 0 {
            return Err(MoeError::Placement(
                "no device to place the experts on".into(),
            ));
        }
        let counts = (0..n)
            .map(|i| num_experts / n + usize::from(i < num_experts % n))
            .collect();
        Self::with_counts(devices, counts)
    }

    /// Device `i` holds the next `counts[i]` experts.
    pub fn with_counts(devices: Vec<Device>, counts: Vec<usize>) -> Result<Self, MoeError> {
        if devices.len() != counts.len() {
            return Err(MoeError::Placement(format!(
                "{} devices but {} expert counts",
                devices.len(),
                counts.len()
            )));
        }
        if let Some(i) = counts.iter().position(|&count| count == 0) {
            return Err(MoeError::Placement(format!(
                "device {i} ({:?}) would hold no expert: give fewer devices than experts",
                devices[i]
            )));
        }
        let mut start = 0;
        let ranges = counts
            .iter()
            .map(|&count| {
                start += count;
                start - count..start
            })
            .collect();
        Ok(Self { devices, ranges })
    }

    /// The devices, in expert order.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The experts each device holds.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Number of experts placed.
    pub fn num_experts(&self) -> usize {
        self.ranges.last().map_or(0, |range| range.end)
    }
}

/// One parameter of a layer's stacked experts as a placement splits it: the saved (gathered)
/// parameter and the shards that hold its experts, in expert order. What turns state kept per
/// shard (the optimizer's moments) into state of the whole stack and back, so that a
/// checkpoint does not depend on how many devices trained it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardedParam {
    /// The id the parameter has gathered (before placement and after).
    pub gathered: ParamId,
    /// The id of each device's shard, with the experts (rows of dimension 0) it holds.
    pub shards: Vec<(ParamId, Range<usize>)>,
}
