//! Our LoRA factors against PEFT's tensors, as plain index arithmetic on the host.
//!
//! Ours: `A: [E, d_in, r]`, `B: [E, r, d_out]`, the update `s A_e B_e` added to the
//! `[d_in, d_out]` weight of expert `e` (`E = 1` for a 2-D weight).
//!
//! PEFT's (`peft.tuners.lora.ParamWrapper`, and `lora.Linear` when `E = 1`): `lora_A.weight:
//! [r E, d_in]` and `lora_B.weight: [d_out, r E]`, expert `e`'s `A` being rows `e r .. e r + r`
//! of `lora_A` and its `B` the columns `k E + e` of `lora_B` (PEFT reshapes `lora_B` to
//! `[d_out, r, E]`); the update of the `[d_out, d_in]` weight is `(alpha / r) B_e A_e`. So
//! `lora_A[e r + k, i] = A[e, i, k]` and `lora_B[o, k E + e] = B[e, k, o]`.

/// One weight's factors in our layout, row-major, in f32.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Factors {
    /// Experts `E` (1 for a 2-D weight).
    pub experts: usize,
    /// Input width `d_in`.
    pub d_in: usize,
    /// Output width `d_out`.
    pub d_out: usize,
    /// Rank `r`.
    pub rank: usize,
    /// `A: [E, d_in, r]`.
    pub a: Vec<f32>,
    /// `B: [E, r, d_out]`.
    pub b: Vec<f32>,
}

/// One weight's factors as PEFT holds them: `lora_A [r E, d_in]`, `lora_B [d_out, r E]`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PeftFactors {
    /// `lora_A.weight`, `[r E, d_in]`.
    pub a: Vec<f32>,
    /// `lora_B.weight`, `[d_out, r E]`.
    pub b: Vec<f32>,
}

impl Factors {
    /// PEFT's tensors for these factors.
    pub fn to_peft(&self) -> PeftFactors {
        let (e_n, d_in, d_out, r) = (self.experts, self.d_in, self.d_out, self.rank);
        let mut a = vec![0.0; r * e_n * d_in];
        let mut b = vec![0.0; d_out * r * e_n];
        for e in 0..e_n {
            for k in 0..r {
                for i in 0..d_in {
                    a[(e * r + k) * d_in + i] = self.a[(e * d_in + i) * r + k];
                }
                for o in 0..d_out {
                    b[o * r * e_n + k * e_n + e] = self.b[(e * r + k) * d_out + o];
                }
            }
        }
        PeftFactors { a, b }
    }

    /// Our factors from PEFT's tensors of rank `rank` over `experts` experts, with `B` scaled
    /// by `ratio` (the file's scale over the one the run uses).
    pub fn from_peft(
        peft: &PeftFactors,
        experts: usize,
        d_in: usize,
        d_out: usize,
        rank: usize,
        ratio: f32,
    ) -> Self {
        let mut a = vec![0.0; experts * d_in * rank];
        let mut b = vec![0.0; experts * rank * d_out];
        for e in 0..experts {
            for k in 0..rank {
                for i in 0..d_in {
                    a[(e * d_in + i) * rank + k] = peft.a[(e * rank + k) * d_in + i];
                }
                for o in 0..d_out {
                    b[(e * rank + k) * d_out + o] =
                        ratio * peft.b[o * rank * experts + k * experts + e];
                }
            }
        }
        Self {
            experts,
            d_in,
            d_out,
            rank,
            a,
            b,
        }
    }

    /// The same update at rank `rank >= self.rank`: `A` gains zero columns and `B` zero rows.
    /// The padding stays zero in training too (each half's gradient is a product with the
    /// other's zeros), so a weight keeps the rank it came with.
    pub fn padded(&self, rank: usize) -> Self {
        assert!(rank >= self.rank, "padding cannot lower the rank");
        let (e_n, d_in, d_out, r) = (self.experts, self.d_in, self.d_out, self.rank);
        let mut a = vec![0.0; e_n * d_in * rank];
        let mut b = vec![0.0; e_n * rank * d_out];
        for e in 0..e_n {
            for i in 0..d_in {
                let (from, to) = ((e * d_in + i) * r, (e * d_in + i) * rank);
                a[to..to + r].copy_from_slice(&self.a[from..from + r]);
            }
            let (from, to) = (e * r * d_out, e * rank * d_out);
            b[to..to + r * d_out].copy_from_slice(&self.b[from..from + r * d_out]);
        }
        Self {
            rank,
            a,
            b,
            ..*self
        }
    }

    /// Two weights that read the same input (a SwiGLU expert's gate and up projections) as
    /// one whose outputs are `gate`'s then `up`'s, as transformers fuses them into
    /// `gate_up_proj`: `A = [A_gate, A_up]` along the rank, `B` block-diagonal. The rank
    /// doubles; the update is exactly the two updates side by side.
    pub fn fused(gate: &Self, up: &Self) -> Self {
        assert_eq!(
            (gate.experts, gate.d_in, gate.rank),
            (up.experts, up.d_in, up.rank),
            "fused weights share experts, input and rank"
        );
        let (e_n, d_in, r) = (gate.experts, gate.d_in, gate.rank);
        let (h_gate, h_up) = (gate.d_out, up.d_out);
        let (rank, d_out) = (2 * r, h_gate + h_up);
        let mut a = vec![0.0; e_n * d_in * rank];
        let mut b = vec![0.0; e_n * rank * d_out];
        for e in 0..e_n {
            for i in 0..d_in {
                let row = (e * d_in + i) * r;
                let to = (e * d_in + i) * rank;
                a[to..to + r].copy_from_slice(&gate.a[row..row + r]);
                a[to + r..to + rank].copy_from_slice(&up.a[row..row + r]);
            }
            for k in 0..r {
                let to = (e * rank + k) * d_out;
                let from = (e * r + k) * h_gate;
                b[to..to + h_gate].copy_from_slice(&gate.b[from..from + h_gate]);
                let to = (e * rank + r + k) * d_out + h_gate;
                let from = (e * r + k) * h_up;
                b[to..to + h_up].copy_from_slice(&up.b[from..from + h_up]);
            }
        }
        Self {
            experts: e_n,
            d_in,
            d_out,
            rank,
            a,
            b,
        }
    }

    /// The inverse reading of [`Factors::fused`] for any fused adapter: outputs `..split` are
    /// the gate's, the rest the up projection's, each keeping the whole `A` (an exact split of
    /// `A B` by output columns, at the fused rank).
    pub fn split_outputs(&self, split: usize) -> (Self, Self) {
        let (e_n, r, d_out) = (self.experts, self.rank, self.d_out);
        let columns = |range: std::ops::Range<usize>| {
            let width = range.len();
            let mut b = Vec::with_capacity(e_n * r * width);
            for row in 0..e_n * r {
                b.extend_from_slice(&self.b[row * d_out + range.start..row * d_out + range.end]);
            }
            Self {
                d_out: width,
                a: self.a.clone(),
                b,
                ..*self
            }
        };
        (columns(0..split), columns(split..d_out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counting values, so that every index lands somewhere different.
    fn factors(experts: usize, d_in: usize, d_out: usize, rank: usize, start: f32) -> Factors {
        let count = |n: usize, from: f32| (0..n).map(|i| from + i as f32).collect();
        Factors {
            experts,
            d_in,
            d_out,
            rank,
            a: count(experts * d_in * rank, start),
            b: count(experts * rank * d_out, start + 1000.0),
        }
    }

    /// The update of expert `e`, `[d_in, d_out]`, from our factors by its definition.
    fn update(f: &Factors, e: usize) -> Vec<f32> {
        let mut w = vec![0.0; f.d_in * f.d_out];
        for i in 0..f.d_in {
            for o in 0..f.d_out {
                w[i * f.d_out + o] = (0..f.rank)
                    .map(|k| {
                        f.a[(e * f.d_in + i) * f.rank + k] * f.b[(e * f.rank + k) * f.d_out + o]
                    })
                    .sum();
            }
        }
        w
    }

    /// The update of expert `e`, `[d_in, d_out]`, from PEFT's tensors as PEFT reshapes them
    /// (`lora_A` to `[E, r, d_in]`, `lora_B` to `[d_out, r, E]`).
    fn peft_update(
        p: &PeftFactors,
        experts: usize,
        d_in: usize,
        d_out: usize,
        r: usize,
        e: usize,
    ) -> Vec<f32> {
        let mut w = vec![0.0; d_in * d_out];
        for i in 0..d_in {
            for o in 0..d_out {
                w[i * d_out + o] = (0..r)
                    .map(|k| p.b[(o * r + k) * experts + e] * p.a[(e * r + k) * d_in + i])
                    .sum();
            }
        }
        w
    }

    #[test]
    fn peft_reshapes_give_our_update_and_read_back() {
        let ours = factors(3, 5, 4, 2, 1.0);
        let peft = ours.to_peft();
        for e in 0..3 {
            assert_eq!(peft_update(&peft, 3, 5, 4, 2, e), update(&ours, e));
        }
        assert_eq!(Factors::from_peft(&peft, 3, 5, 4, 2, 1.0), ours);
        let halved = Factors::from_peft(&peft, 3, 5, 4, 2, 0.5);
        assert_eq!(halved.a, ours.a);
        assert_eq!(halved.b, ours.b.iter().map(|x| x * 0.5).collect::<Vec<_>>());
    }

    #[test]
    fn fusing_and_padding_keep_the_update() {
        let (gate, up) = (factors(2, 3, 4, 2, 1.0), factors(2, 3, 5, 2, 50.0));
        let fused = Factors::fused(&gate, &up);
        assert_eq!((fused.rank, fused.d_out), (4, 9));
        for e in 0..2 {
            let (g, u, f) = (update(&gate, e), update(&up, e), update(&fused, e));
            for i in 0..3 {
                assert_eq!(&f[i * 9..i * 9 + 4], &g[i * 4..i * 4 + 4]);
                assert_eq!(&f[i * 9 + 4..i * 9 + 9], &u[i * 5..i * 5 + 5]);
            }
        }
        let (g, u) = fused.split_outputs(4);
        for e in 0..2 {
            assert_eq!(update(&g, e), update(&gate, e));
            assert_eq!(update(&u, e), update(&up, e));
        }
        let padded = gate.padded(5);
        assert_eq!(padded.rank, 5);
        for e in 0..2 {
            assert_eq!(update(&padded, e), update(&gate, e));
        }
    }
}
