//! flex's AdamW update: one pass over the parameter, split over the cores, reading `θ, g, m, v`
//! and writing the new `θ, m, v` once each; `f32` only (the other types use the composed ops).

use std::mem::MaybeUninit;

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};
use rayon::prelude::*;

use crate::adamw::{composed_adamw_update, AdamWBackend, AdamWStep, Scalars};

use super::contiguous;

/// Elements per rayon task.
const CHUNK: usize = 1 << 15;

impl AdamWBackend for Flex {
    fn adamw_update(
        param: FlexTensor,
        grad: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        step: AdamWStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let all_f32 = [&param, &grad, &moment_1, &moment_2]
            .iter()
            .all(|tensor| tensor.dtype() == DType::F32);
        if !all_f32 {
            return composed_adamw_update::<Flex>(param, grad, moment_1, moment_2, step);
        }
        let shape = param.shape();
        let [param, grad, moment_1, moment_2] =
            [param, grad, moment_1, moment_2].map(contiguous::<f32>);
        let len = shape.num_elements();
        let (mut new_param, mut new_1, mut new_2): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            Vec::with_capacity(len),
            Vec::with_capacity(len),
            Vec::with_capacity(len),
        );
        let (theta, g, m, v) = (
            values(&param),
            values(&grad),
            values(&moment_1),
            values(&moment_2),
        );
        let scalars = step.scalars();
        new_param.spare_capacity_mut()[..len]
            .par_chunks_mut(CHUNK)
            .zip(new_1.spare_capacity_mut()[..len].par_chunks_mut(CHUNK))
            .zip(new_2.spare_capacity_mut()[..len].par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(task, ((out_theta, out_m), out_v))| {
                let range = task * CHUNK..task * CHUNK + out_theta.len();
                update_f32(
                    [
                        &theta[range.clone()],
                        &g[range.clone()],
                        &m[range.clone()],
                        &v[range],
                    ],
                    [out_theta, out_m, out_v],
                    scalars,
                );
            });
        // SAFETY: every element of the three outputs was written by `update_f32` above.
        unsafe {
            new_param.set_len(len);
            new_1.set_len(len);
            new_2.set_len(len);
        }
        let tensor =
            |values: Vec<f32>| FlexTensor::from_data(TensorData::new(values, shape.clone()));
        (tensor(new_param), tensor(new_1), tensor(new_2))
    }
}

/// A contiguous `f32` tensor's values.
fn values(tensor: &FlexTensor) -> &[f32] {
    tensor
        .as_slice::<f32>()
        .expect("contiguous after `contiguous`")
}

vectorised! {
    /// The update of one block: inputs `[θ, g, m, v]`, outputs `[θ, m, v]`, element by element
    /// in burn-optim's order of operations.
    fn update_f32(inputs: [&[f32]; 4], outputs: [&mut [MaybeUninit<f32>]; 3], s: Scalars) {
        let [theta, g, m, v] = inputs;
        let [out_theta, out_m, out_v] = outputs;
        let elements = theta.iter().zip(g).zip(m.iter().zip(v));
        let outs = out_theta.iter_mut().zip(out_m.iter_mut().zip(out_v.iter_mut()));
        for (((&theta, &g), (&m, &v)), (out_theta, (out_m, out_v))) in elements.zip(outs) {
            let m = m * s.beta_1 + g * s.one_minus_beta_1;
            let v = v * s.beta_2 + g * g * s.one_minus_beta_2;
            let delta = (m / s.correction_1) / ((v / s.correction_2).sqrt() + s.epsilon);
            out_theta.write(theta * s.keep - delta * s.lr);
            out_m.write(m);
            out_v.write(v);
        }
    }
}
