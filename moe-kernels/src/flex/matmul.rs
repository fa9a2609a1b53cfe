//! flex's dense products through the grouped matmul's machinery with every row filled: one
//! `gemm` call per batch entry (one for a 2D product, split over the cores when large), the
//! operands' strides passed as they are and the output written once.

use burn::backend::flex::{Flex, FlexTensor};
use burn::backend::ops::FloatTensorOps;
use burn::backend::TensorMetadata;
use burn::tensor::DType;

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
        let product = match (x.dtype(), w.dtype()) {
            (DType::F32, DType::F32) => product.run::<f32>(&x, &w),
            (DType::F64, DType::F64) => product.run::<f64>(&x, &w),
            _ => return Flex::float_matmul(x, w),
        };
        Flex::float_reshape(product, [rows, columns].into())
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
        match (x.dtype(), w.dtype()) {
            (DType::F32, DType::F32) => products.run::<f32>(&x, &w),
            (DType::F64, DType::F64) => products.run::<f64>(&x, &w),
            _ => Flex::float_matmul(x, w),
        }
    }
}
