//! The flex backend's implementations of this crate's operations: hand-written kernels where
//! flex's own ops are slow for what moe-core asks of them.

/// Runs `body` through the widest vector instruction set this CPU supports: the loops in
/// `body` are compiled three times and the right copy is picked at run time (x86-64), so a
/// binary built for the baseline x86-64 still uses AVX-512 or AVX2 where they exist.
macro_rules! vectorised {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Element type of the storage the kernels read and write.
trait Float:
    burn::tensor::Element
    + bytemuck::Pod
    + Send
    + Sync
    + std::ops::Add<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Sub<Output = Self>
{
    /// `0`.
    const ZERO: Self;
}
impl Float for f32 {
    const ZERO: Self = 0.0;
}
impl Float for f64 {
    const ZERO: Self = 0.0;
}

/// Whole rows of `row` elements per rayon task, for tasks of about `chunk` elements (at least
/// one row).
fn rows_per_task(row: usize, chunk: usize) -> usize {
    (chunk / row.max(1)).max(1)
}

/// A `[rows, row]` buffer whose blocks of `block` whole rows `fill(first_row, block)` writes in
/// parallel; `fill` must write every element of its block.
fn written_rows<E: Float>(
    rows: usize,
    row: usize,
    block: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<E>]) + Sync,
) -> Vec<E> {
    use rayon::prelude::*;
    let len = rows * row;
    let mut output: Vec<E> = Vec::with_capacity(len);
    if len > 0 {
        output.spare_capacity_mut()[..len]
            .par_chunks_mut(block * row)
            .enumerate()
            .for_each(|(task, out)| fill(task * block, out));
        // SAFETY: every element was written by `fill` (its contract).
        unsafe { output.set_len(len) };
    }
    output
}

/// The values of an index tensor as positions, each checked to be below `bound` (flex tensors
/// live in host memory, so this waits for nothing).
///
/// # Panics
///
/// If a value is negative or not below `bound`: "`{what} {value} is out of range for {bound}
/// {of}`", as Burn's `select` and `gather` refuse such an index.
fn checked_indices(
    index: burn::backend::flex::FlexTensor,
    bound: usize,
    what: &str,
    of: &str,
) -> Vec<usize> {
    index
        .into_data()
        .iter::<i64>()
        .map(|value| {
            assert!(
                (0..bound as i64).contains(&value),
                "{what} {value} is out of range for {bound} {of}"
            );
            value as usize
        })
        .collect()
}

/// A matrix's data as one contiguous row-major slice, with its row length.
fn matrix<E: Float>(tensor: &burn::backend::flex::FlexTensor) -> (&[E], usize) {
    use burn::backend::TensorMetadata;
    let shape = tensor.shape();
    let row = shape[shape.num_dims() - 1];
    let data = tensor
        .as_slice::<E>()
        .expect("the kernels are given contiguous tensors");
    (data, row)
}

/// `x` with a layout that is one contiguous run of its storage (copied only if it is not).
fn contiguous<E: Float>(x: burn::backend::flex::FlexTensor) -> burn::backend::flex::FlexTensor {
    if x.as_slice::<E>().is_some() {
        x
    } else {
        x.to_contiguous()
    }
}

mod activations;
mod adamw;
mod cross_entropy;
mod dropout;
mod frozen;
mod gather_scatter;
mod grouped_matmul;
mod matmul;
mod products;
mod rms_norm;
mod rotary;
mod routing;
mod softmax;
mod top_k;
