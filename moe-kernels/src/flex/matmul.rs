//! flex's dense products through the grouped matmul's machinery with every row filled: one
//! `gemm` call per batch entry (one for a 2D product, split over the cores when large), the
//! operands' strides passed as they are and the output written once.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::ops::FloatTensorOps;
use burn::backend::TensorMetadata;

use super::grouped_matmul::{Operand, Products};
use crate::matmul::MatmulBackend;

impl MatmulBackend for Flex {
    fn matmul_2d(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (x_shape, w_shape) = (x.shape(), w.shape());
        let (rows, inner, columns) = (x_shape[0], x_shape[1], w_shape[1]);
        let product = Products {
            out_shape: [1, rows, columns],
            lhs: Operand::matrix_2d(&x),
            rhs: Operand::matrix_2d(&w),
            sizes: vec![(rows, inner)],
        };
        match product.run_float(&x, &w) {
            Some(product) => Flex::float_reshape(product, [rows, columns].into()),
            None => Flex::float_matmul(x, w),
        }
    }

    fn batched_matmul(x: FlexTensor, w: FlexTensor) -> FlexTensor {
        let (x_shape, w_shape) = (x.shape(), w.shape());
        let (batch, rows, inner, columns) = (x_shape[0], x_shape[1], x_shape[2], w_shape[2]);
        let products = Products {
            out_shape: [batch, rows, columns],
            lhs: Operand::matrix(&x),
            rhs: Operand::matrix(&w),
            sizes: vec![(rows, inner); batch],
        };
        products
            .run_float(&x, &w)
            .unwrap_or_else(|| Flex::float_matmul(x, w))
    }
}
