//! Counter-based random numbers: the `i`-th number of a stream is a hash of `i` and the
//! stream's key, so any element can be drawn independently of the others, in any order, on
//! any core, and drawn again in the backward pass (Salmon et al. 2011, "Parallel random
//! numbers: as easy as 1, 2, 3", the idea behind Philox; our hash is smaller).
//!
//! `draw(i, key) = fmix(fmix(i · φ ⊕ key[0]) ⊕ key[1])`, where `φ = 0x9E3779B1` (odd, from
//! the golden ratio) and `fmix` is MurmurHash3's 32-bit finaliser. Every step is a bijection
//! of `u32`, so for a fixed key `draw` permutes the 2³² indices: over any 2³² consecutive
//! indices each value appears exactly once. Only 32-bit multiplies, shifts and xors, so a loop
//! over consecutive indices vectorises.

/// The odd multiplier that spreads consecutive indices over the 32 bits.
const SPREAD: u32 = 0x9E37_79B1;

/// MurmurHash3's finaliser: a bijection of `u32` in which every input bit flips each output
/// bit with probability close to 1/2.
#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// The `index`-th random `u32` of the stream `key`.
#[inline(always)]
pub fn draw(index: u32, key: [u32; 2]) -> u32 {
    fmix(fmix(index.wrapping_mul(SPREAD) ^ key[0]) ^ key[1])
}

/// The threshold below which a draw means "drop" for drop probability `prob` in `[0, 1)`:
/// `P(draw < threshold) = threshold / 2³²`, the closest such fraction to `prob`.
pub fn drop_threshold(prob: f64) -> u32 {
    (prob * 4_294_967_296.0).round().clamp(0.0, u32::MAX as f64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over 2¹⁶ indices each of 256 buckets of the top 8 bits gets 256 draws in expectation;
    /// the chi-square statistic (255 degrees of freedom) must stay below its 0.999 quantile.
    #[test]
    fn draws_are_uniform() {
        for key in [[0, 0], [1, 0], [0xDEAD_BEEF, 12345]] {
            let mut buckets = [0u32; 256];
            for index in 0..1 << 16 {
                buckets[(draw(index, key) >> 24) as usize] += 1;
            }
            let chi_square: f64 = buckets
                .iter()
                .map(|&count| (count as f64 - 256.0).powi(2) / 256.0)
                .sum();
            assert!(chi_square < 330.5, "key {key:?}: chi-square {chi_square}");
        }
    }

    /// A permutation: no two of 2²⁰ indices collide.
    #[test]
    fn draws_do_not_repeat() {
        let mut seen: Vec<u32> = (0..1 << 20).map(|index| draw(index, [7, 9])).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 1 << 20);
    }

    /// Neighbouring indices and neighbouring keys are unrelated: the low bit agrees half the
    /// time (within 5 standard deviations over 2¹⁶ pairs).
    #[test]
    fn neighbours_are_independent() {
        let pairs = 1u32 << 16;
        let agree = |f: &dyn Fn(u32) -> (u32, u32)| {
            (0..pairs)
                .filter(|&i| {
                    let (a, b) = f(i);
                    (a & 1) == (b & 1)
                })
                .count() as f64
        };
        let limit = 5.0 * (pairs as f64 * 0.25).sqrt();
        let half = pairs as f64 / 2.0;
        let next_index = agree(&|i| (draw(i, [3, 4]), draw(i + 1, [3, 4])));
        let next_key = agree(&|i| (draw(i, [3, 4]), draw(i, [4, 4])));
        let other_word = agree(&|i| (draw(i, [3, 4]), draw(i, [3, 5])));
        for (what, count) in [
            ("next index", next_index),
            ("next key", next_key),
            ("other key word", other_word),
        ] {
            assert!((count - half).abs() < limit, "{what}: {count} of {pairs}");
        }
    }

    #[test]
    fn thresholds() {
        assert_eq!(drop_threshold(0.0), 0);
        assert_eq!(drop_threshold(0.5), 1 << 31);
        assert_eq!(drop_threshold(0.1), 429_496_730);
        assert_eq!(drop_threshold(0.999_999_999_99), u32::MAX);
    }
}
