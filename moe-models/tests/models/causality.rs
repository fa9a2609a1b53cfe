//! Changing token t never changes the logits before t.

use moe_core::CapacityConfig;
use moe_models::PositionKind;

use crate::common::{cpu, random_ids, tiny, tokens, values, VOCAB};

#[test]
fn changing_a_token_never_changes_earlier_logits() {
    let device = cpu();
    let length = 12;
    for positions in [PositionKind::Rotary, PositionKind::Learned] {
        // A tight capacity, so the position drop policy is exercised too.
        for capacity in [
            CapacityConfig::new()
                .with_eval_factor(0.5)
                .with_min_capacity(1),
            CapacityConfig::dropless(),
        ] {
            device.seed(3);
            let model = tiny(positions, capacity.clone()).init(&device).unwrap();
            let base = random_ids(2 * length, VOCAB, 11);
            let base_logits = values(model.forward(tokens(&base, 2, &device)).logits);
            for t in [0, 5, 11] {
                let mut changed = base.clone();
                changed[t] = (changed[t] + 7) % VOCAB; // first sequence
                changed[length + t] = (changed[length + t] + 3) % VOCAB; // second sequence
                let logits = values(model.forward(tokens(&changed, 2, &device)).logits);
                for b in 0..2 {
                    for position in 0..length {
                        let row = (b * length + position) * VOCAB;
                        let same = base_logits[row..row + VOCAB] == logits[row..row + VOCAB];
                        if position < t {
                            assert!(
                                same,
                                "{positions:?}: changing token {t} changed logits at {position}"
                            );
                        } else if position == t {
                            assert!(
                                !same,
                                "{positions:?}: changing token {t} did not change its own logits"
                            );
                        }
                    }
                }
            }
        }
    }
}
