//! A small real multimodal task: 8x8 images of the digits 0-9 paired with their Chinese
//! numerals (零 一 二 ... 九). The images are drawn by code from a 5x7 bitmap font with a random
//! shift, stroke brightness and background noise, so nothing is downloaded.
//!
//! - captioning: image patches -> `[numeral, <eos>]`;
//! - text-to-image: `[<bos>, numeral]` -> 64 pixel tokens (each pixel quantised to a few levels).

use burn::tensor::{Device, Int, Tensor, TensorData};
use moe_core::rng::SplitMix64;

/// Side of the images.
pub const IMAGE_SIZE: usize = 8;

/// The numerals, in digit order.
pub const NUMERALS: [&str; 10] = ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"];

/// Text vocabulary of the task: `<pad> <bos> <eos>` then the ten numerals.
pub const TEXT_VOCAB: [&str; 13] = [
    "<pad>", "<bos>", "<eos>", "零", "一", "二", "三", "四", "五", "六", "七", "八", "九",
];

/// Id of `<bos>`.
pub const BOS: usize = 1;
/// Id of `<eos>`.
pub const EOS: usize = 2;

/// Text token id of digit `d`.
pub fn numeral_token(digit: usize) -> usize {
    3 + digit
}

/// 5x7 glyphs, one string of five `#`/`.` per row.
const GLYPHS: [[&str; 7]; 10] = [
    [
        ".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###.",
    ],
    [
        "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###.",
    ],
    [
        ".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####",
    ],
    [
        "####.", "....#", "....#", ".###.", "....#", "....#", "####.",
    ],
    [
        "...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#.",
    ],
    [
        "#####", "#....", "####.", "....#", "....#", "#...#", ".###.",
    ],
    [
        "..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###.",
    ],
    [
        "#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#...",
    ],
    [
        ".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###.",
    ],
    [
        ".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##..",
    ],
];

/// Draws digit `digit` as an 8x8 grayscale image in `[0, 1]`, row-major.
pub fn draw(digit: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let mut pixels = vec![0f32; IMAGE_SIZE * IMAGE_SIZE];
    for p in pixels.iter_mut() {
        *p = (rng.unit() * 0.15) as f32;
    }
    let dx = rng.below(IMAGE_SIZE - 5 + 1);
    let dy = rng.below(IMAGE_SIZE - 7 + 1);
    let brightness = 0.7 + 0.3 * rng.unit();
    for (row, line) in GLYPHS[digit % 10].iter().enumerate() {
        for (column, cell) in line.bytes().enumerate() {
            if cell == b'#' {
                let value = brightness - 0.1 * rng.unit();
                pixels[(row + dy) * IMAGE_SIZE + column + dx] = value as f32;
            }
        }
    }
    pixels
}

/// Quantises a pixel in `[0, 1]` to one of `levels` tokens.
pub fn quantize(pixel: f32, levels: usize) -> usize {
    ((pixel.clamp(0.0, 1.0) * levels as f32) as usize).min(levels - 1)
}

/// A batch of the task.
#[derive(Debug, Clone)]
pub struct DigitBatch {
    /// The digits drawn.
    pub digits: Vec<usize>,
    /// Images, `[batch, 1, 8, 8]`.
    pub images: Tensor<4>,
    /// Quantised pixels, `[batch, 64]`.
    pub image_tokens: Tensor<2, Int>,
    /// Captions `[numeral, <eos>]`, `[batch, 2]`.
    pub captions: Tensor<2, Int>,
    /// Prompts `[<bos>, numeral]` for text-to-image, `[batch, 2]`.
    pub prompts: Tensor<2, Int>,
}

/// `batch_size` random digits, pixels quantised to `levels` tokens.
pub fn batch(
    batch_size: usize,
    levels: usize,
    rng: &mut SplitMix64,
    device: &Device,
) -> DigitBatch {
    let digits: Vec<usize> = (0..batch_size).map(|_| rng.below(10)).collect();
    let mut pixels = Vec::with_capacity(batch_size * IMAGE_SIZE * IMAGE_SIZE);
    for &digit in &digits {
        pixels.extend(draw(digit, rng));
    }
    batch_of(digits, pixels, levels, device)
}

/// The batch of the images `pixels` (`8 x 8` each, in `[0, 1]`, one after the other) showing
/// `digits`, pixels quantised to `levels` tokens.
pub fn batch_of(
    digits: Vec<usize>,
    pixels: Vec<f32>,
    levels: usize,
    device: &Device,
) -> DigitBatch {
    let batch_size = digits.len();
    let tokens: Vec<i64> = pixels.iter().map(|&p| quantize(p, levels) as i64).collect();
    let captions: Vec<i64> = digits
        .iter()
        .flat_map(|&d| [numeral_token(d) as i64, EOS as i64])
        .collect();
    let prompts: Vec<i64> = digits
        .iter()
        .flat_map(|&d| [BOS as i64, numeral_token(d) as i64])
        .collect();
    let pixel_count = IMAGE_SIZE * IMAGE_SIZE;
    DigitBatch {
        images: Tensor::from_data(
            TensorData::new(pixels, [batch_size, 1, IMAGE_SIZE, IMAGE_SIZE]),
            device,
        ),
        image_tokens: Tensor::from_data(TensorData::new(tokens, [batch_size, pixel_count]), device),
        captions: Tensor::from_data(TensorData::new(captions, [batch_size, 2]), device),
        prompts: Tensor::from_data(TensorData::new(prompts, [batch_size, 2]), device),
        digits,
    }
}
