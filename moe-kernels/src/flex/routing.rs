//! flex's dispatch-plan steps: the column prefix sums and the slot inversion as single passes
//! over the `[tokens, E]` matrix (Burn's composed forms take several ops and a `[tokens x E]`
//! `arange`).

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::TensorMetadata;
use burn::tensor::{DType, TensorData};

use crate::routing::RoutingBackend;

impl RoutingBackend for Flex {
    fn exclusive_cumsum(x: FlexTensor) -> FlexTensor {
        match x.dtype() {
            DType::I64 => column_prefixes::<i64>(x),
            DType::I32 => column_prefixes::<i32>(x),
            _ => composed_exclusive_cumsum(x),
        }
    }

    fn invert_slots(slot_of_pair: FlexTensor, slots: usize) -> FlexTensor {
        match slot_of_pair.dtype() {
            DType::I64 => pairs_of_slots::<i64>(slot_of_pair, slots),
            DType::I32 => pairs_of_slots::<i32>(slot_of_pair, slots),
            _ => crate::routing::composed_invert_slots::<Flex>(slot_of_pair, slots),
        }
    }
}

/// The integer types the passes read in place.
trait Index: burn::tensor::Element + bytemuck::Pod + Into<i64> + TryFrom<i64> {}
impl Index for i64 {}
impl Index for i32 {}

/// `y[t][e] = Σ_{t' < t} x[t'][e]`, row by row with a running total per column.
fn column_prefixes<I: Index>(x: FlexTensor) -> FlexTensor {
    let shape = x.shape();
    let columns = shape[1].max(1);
    let x = if x.as_slice::<I>().is_some() {
        x
    } else {
        x.to_contiguous()
    };
    let values = x.as_slice::<I>().expect("contiguous");
    let mut running = vec![0i64; columns];
    let mut prefixes: Vec<I> = Vec::with_capacity(values.len());
    for row in values.chunks(columns) {
        for (&value, total) in row.iter().zip(running.iter_mut()) {
            prefixes.push(narrow(*total));
            *total += value.into();
        }
    }
    FlexTensor::from_data(TensorData::new(prefixes, shape))
}

/// `y[slot_of_pair[p]] = p` for the pairs whose slot is below `slots`, the number of pairs
/// elsewhere.
fn pairs_of_slots<I: Index>(slot_of_pair: FlexTensor, slots: usize) -> FlexTensor {
    let slot_of_pair = if slot_of_pair.as_slice::<I>().is_some() {
        slot_of_pair
    } else {
        slot_of_pair.to_contiguous()
    };
    let pairs = slot_of_pair.as_slice::<I>().expect("contiguous");
    let mut pair_of_slot: Vec<I> = vec![narrow(pairs.len() as i64); slots];
    for (pair, &slot) in pairs.iter().enumerate() {
        let slot: i64 = slot.into();
        if (0..slots as i64).contains(&slot) {
            pair_of_slot[slot as usize] = narrow(pair as i64);
        }
    }
    FlexTensor::from_data(TensorData::new(pair_of_slot, [slots]))
}

/// `value` in the index type (the counts and positions of a plan fit in it by construction:
/// they are below the number of pairs, which Burn indexes with that type).
fn narrow<I: Index>(value: i64) -> I {
    I::try_from(value)
        .ok()
        .expect("a plan's counts fit its index type")
}

/// [`RoutingBackend::exclusive_cumsum`]'s default body, for other integer types.
fn composed_exclusive_cumsum(x: FlexTensor) -> FlexTensor {
    use burn::backend::ops::IntTensorOps;
    let inclusive = Flex::int_cumsum(x.clone(), 0);
    Flex::int_sub(inclusive, x)
}
