//! The comparisons every crate's tests share, in one argument order: what is compared first,
//! then the values, then the tolerance.

/// Asserts `|actual - expected| <= tolerance * (1 + |expected|)` elementwise (a relative
/// tolerance that turns absolute near zero); an infinite expected value must be matched
/// exactly.
///
/// # Panics
///
/// When the lengths differ or an element is out of tolerance, naming `what` and the element.
pub fn assert_close(what: &str, actual: &[f64], expected: &[f64], tolerance: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let close = if e.is_infinite() {
            a == e
        } else {
            (a - e).abs() <= tolerance * (1.0 + e.abs())
        };
        assert!(
            close,
            "{what}: element {i} is {a}, expected {e} (tolerance {tolerance})"
        );
    }
}

/// Asserts `|actual - expected| <= tolerance * max |expected|` elementwise: the tolerance
/// relative to the reference's largest magnitude, for comparing two backends whose rounding
/// differs in every element (a small element may differ by much more than itself).
///
/// # Panics
///
/// When the lengths differ or an element is out of tolerance, naming `what` and the element.
pub fn assert_close_to_largest(what: &str, actual: &[f64], expected: &[f64], tolerance: f64) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    let bound = tolerance * expected.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= bound,
            "{what}: element {i} is {a}, reference {e} (tolerance {bound:.2e})"
        );
    }
}

/// The largest elementwise difference `max |a - b|` (f32 or f64 values).
///
/// # Panics
///
/// When the lengths differ.
pub fn max_difference<T: Copy + Into<f64>>(a: &[T], b: &[T]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x.into() - y.into()).abs())
        .fold(0.0, f64::max)
}
