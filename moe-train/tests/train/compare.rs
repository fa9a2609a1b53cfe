//! `compare`: the MoE config and its dense twin on the same data, and when one reached the
//! other's final loss.

use moe_train::commands::compare::{compare, first_reach};
use moe_train::store::checkpoint;
use moe_train::training::RunOptions;

use crate::common::tiny_run;

#[test]
fn the_first_evaluation_at_or_below_the_target_is_the_reach() {
    let curve = vec![
        (50, 10.0, 6.0),
        (100, 20.0, 5.5),
        (150, 30.0, 5.2),
        (200, 40.0, 5.1),
    ];
    assert_eq!(first_reach(&curve, 5.3), Some((150, 30.0)));
    assert_eq!(first_reach(&curve, 5.2), Some((150, 30.0)));
    assert_eq!(first_reach(&curve, 6.5), Some((50, 10.0)));
    assert_eq!(first_reach(&curve, 5.0), None);
}

#[test]
fn both_runs_see_the_same_batches_and_the_plot_is_drawn() {
    let _serial = crate::common::serial();
    let (dir, mut config) = tiny_run("compare", 12);
    config.run.eval_every = 4;
    let out = dir.join("compare");
    let comparison = compare(&config, &out, RunOptions::new(out.clone())).unwrap();
    // Same seed, same sampler: both runs end at the same data position.
    let (moe_state, moe_config) =
        checkpoint::read_state(&checkpoint::resolve(&out.join("moe")).unwrap()).unwrap();
    let (dense_state, dense_config) =
        checkpoint::read_state(&checkpoint::resolve(&out.join("dense")).unwrap()).unwrap();
    assert_eq!(moe_state.data_rng, dense_state.data_rng);
    assert_eq!(moe_state.tokens_seen, dense_state.tokens_seen);
    assert!(!moe_config.variant.dense && dense_config.variant.dense);
    // Equal work per token: the dense twin has the MoE model's active parameters... less the
    // routers.
    assert!(comparison.dense.parameters.0 < comparison.moe.parameters.0);
    assert_eq!(
        comparison
            .moe_curve
            .iter()
            .map(|point| point.0)
            .collect::<Vec<_>>(),
        [4, 8, 12]
    );
    assert!(comparison
        .moe_curve
        .windows(2)
        .all(|pair| pair[1].1 >= pair[0].1));
    assert!(comparison.plot.as_ref().is_some_and(|plot| plot.exists()));
    let verdict = comparison.verdict();
    assert!(
        verdict.contains("dense model's final validation loss"),
        "{verdict}"
    );
}
