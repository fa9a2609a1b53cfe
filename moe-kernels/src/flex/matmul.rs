//! flex's dense products through the grouped matmul's machinery with every row filled: one
//! `gemm` call per batch entry (one for a 2D product, split over the cores when large), the
//! operands' strides passed as they are and the output written once, in the storage order
//! asked for (so that attention's heads need no copy to be split or merged).

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::ops::FloatTensorOps;
use burn::backend::TensorMetadata;

use super::products::{Operand, Products, StorageOrder, ROW_MAJOR};
use crate::matmul::MatmulBackend;

impl MatmulBackend for Flex {
    fn matmul_2d(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (x_shape, w_shape) = (x.shape(), w.shape());
        let (rows, inner, columns) = (x_shape[0], x_shape[1], w_shape[1]);
        let product = Products {
            batch: vec![],
            matrix: [rows, columns],
            order: ROW_MAJOR,
            lhs: Operand::new(&x),
            rhs: Operand::new(&w),
            sizes: vec![(rows, inner)],
        };
        product
            .run_float(&x, &w)
            .unwrap_or_else(|| Flex::float_matmul(x, w))
    }

    fn batched_matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (x_shape, w_shape) = (x.shape(), w.shape());
        let (batch, rows, inner, columns) = (x_shape[0], x_shape[1], x_shape[2], w_shape[2]);
        let products = Products {
            batch: vec![batch],
            matrix: [rows, columns],
            order: ROW_MAJOR,
            lhs: Operand::new(&x),
            rhs: Operand::new(&w),
            sizes: vec![(rows, inner); batch],
        };
        products
            .run_float(&x, &w)
            .unwrap_or_else(|| Flex::float_matmul(x, w))
    }

    fn multi_head_matmul(x: FlexTensor, w: FlexTensor, order: StorageOrder) -> FlexTensor {
        let (x_shape, w_shape) = (x.shape(), w.shape());
        let [batch, heads, rows, inner] = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
        let columns = w_shape[3];
        let products = Products {
            batch: vec![batch, heads],
            matrix: [rows, columns],
            order,
            lhs: Operand::new(&x),
            rhs: Operand::new(&w),
            sizes: vec![(rows, inner); batch * heads],
        };
        products
            .run_float(&x, &w)
            .unwrap_or_else(|| Flex::float_matmul(x, w))
    }

    fn storage_order(x: &FlexTensor) -> StorageOrder {
        let strides = x.layout().strides();
        if strides.len() != 4 {
            return ROW_MAJOR;
        }
        // Largest stride first; a tie (a dimension of size 1) keeps the logical order.
        let mut order = ROW_MAJOR;
        order.sort_by_key(|&dim| std::cmp::Reverse(strides[dim].unsigned_abs()));
        order
    }
}
