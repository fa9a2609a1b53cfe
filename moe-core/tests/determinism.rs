//! Same seed, same outputs, also when the gate draws random numbers in training.
//!
//! A test binary of its own: Burn's CPU backends keep one random generator per process, so
//! tests drawing from it in parallel threads would interleave their draws. The two tests here
//! take a lock for the same reason.

mod common;

fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

use moe_core::{ExpertConfig, GateConfig, MoeConfig, RoutingMode};

use common::{cpu, matrix, random_values, values};

#[test]
fn same_seed_same_init() {
    let _serial = serial();
    let device = cpu();
    let init = |seed: u64| {
        device.seed(seed);
        let moe = MoeConfig::new(6, 4, ExpertConfig::new(8))
            .init(&device)
            .unwrap();
        values(moe.experts.w_in.val())
    };
    assert_eq!(init(3), init(3));
    assert_ne!(init(3), init(4));
}

#[test]
fn same_seed_same_noise_different_seed_different_noise() {
    let _serial = serial();
    let device = cpu();
    let (tokens, d_model) = (32, 6);
    let x = matrix(
        &random_values(tokens * d_model, 11),
        tokens,
        d_model,
        &device,
    );
    for (gate, top_k) in [
        (GateConfig::noisy(), 2),
        (GateConfig::gshard(), 2),
        (GateConfig::switch(), 1),
    ] {
        device.seed(1);
        let moe = MoeConfig::new(d_model, 4, ExpertConfig::new(8))
            .with_top_k(top_k)
            .with_gate(gate.clone())
            .init(&device)
            .unwrap();
        let run = |seed: u64| {
            device.seed(seed);
            let out = moe.forward_with_mode(x.clone(), RoutingMode::Train);
            (values(out.output), values(out.aux_loss))
        };
        let (a, aux_a) = run(7);
        let (b, aux_b) = run(7);
        assert_eq!(
            a,
            b,
            "{} gate: same seed gave different outputs",
            gate.name()
        );
        assert_eq!(aux_a, aux_b);
        let (c, _) = run(8);
        assert_ne!(
            a,
            c,
            "{} gate: the noise did not change with the seed",
            gate.name()
        );
    }
}
