//! What keeps a long run safe: divergence stops before a finite checkpoint is replaced,
//! skipped steps leave the weights finite, non-finite models are refused, the run folder is
//! owned, the metrics log survives a cut line, and the memory estimate.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor};
use moe_train::cli::{EvalArgs, GenerateArgs};
use moe_train::commands;
use moe_train::error::TrainError;
use moe_train::store::checkpoint;
use moe_train::store::metrics::{read, MetricsLog, Row};
use moe_train::store::run_dir::{Claim, RunDir};
use moe_train::training::divergence::{
    non_finite_parameters, NonFiniteWatch, OnNonFinite, SpikeDetector,
};
use moe_train::training::{train, RunOptions};

use crate::common::{temp_dir, tiny_run};

#[allow(deprecated)]
fn cpu() -> Device {
    Device::ndarray()
}

fn eval_args(checkpoint: std::path::PathBuf) -> EvalArgs {
    EvalArgs::checkpoint(
        checkpoint,
        moe_train::runtime::backend::BackendChoice::Ndarray,
    )
}

/// The latest checkpoint of the run in `out`: its folder, tokenizer and model (on ndarray).
fn latest_model(
    out: &std::path::Path,
    config: &moe_train::config::TrainConfig,
) -> (
    std::path::PathBuf,
    moe_train::data::tokenizer::Tokenizer,
    moe_models::MoeTransformer,
) {
    let folder = checkpoint::resolve(out).unwrap();
    let tokenizer =
        moe_train::data::tokenizer::Tokenizer::load(&folder.join(checkpoint::TOKENIZER_FILE))
            .unwrap();
    let model = config
        .text_model_config(tokenizer.vocab_size())
        .init(&cpu())
        .unwrap();
    let model = checkpoint::load_model(&folder, model).unwrap();
    (folder, tokenizer, model)
}

/// A learning rate that blows the tiny model up within a few steps, without clipping.
fn blow_up(config: &mut moe_train::config::TrainConfig) {
    config.optim.lr = 1e6;
    config.optim.min_lr = 1e5;
    config.optim.grad_clip = 0.0;
}

#[test]
fn a_diverging_resume_stops_and_keeps_the_finite_checkpoint() {
    let _serial = crate::common::serial();
    let (dir, mut config) = tiny_run("guard-diverge", 4);
    config.run.keep_checkpoints = 1;
    config.run.checkpoint_every = 2;
    let out = dir.join("run");
    train(config.clone(), RunOptions::new(out.clone())).unwrap();

    // The same run continued with a learning rate that blows up, without clipping.
    config.run.steps = 40;
    blow_up(&mut config);
    let error = train(
        config,
        RunOptions {
            resume: true,
            ..RunOptions::new(out.clone())
        },
    )
    .unwrap_err();
    let TrainError::Diverged { step, .. } = &error else {
        panic!("expected a divergence, got {error}");
    };
    assert!(*step > 4, "diverged at step {step}");
    assert_eq!(error.exit_code(), 3);
    // keep_checkpoints = 1, yet the latest checkpoint is one from before the divergence,
    // whole, finite, and named in the message.
    let opened = checkpoint::open(&out, moe_train::store::checkpoint::Verify::Checked).unwrap();
    assert!(opened.state.step >= 4 && opened.state.step < *step);
    let message = error.to_string();
    assert!(
        message.contains(&opened.folder.display().to_string()),
        "{message}"
    );
    if *step > 6 && (*step - 1) % 2 == 0 {
        // A checkpoint was written just before the non-finite step, with the weights that
        // gave it: it is moved aside, not left as `latest`.
        assert!(message.contains("diverged-step-"), "{message}");
        assert_eq!(opened.state.step, *step - 3);
    }
    let report = commands::evaluate(&eval_args(out.clone())).unwrap();
    assert!(report.evaluation.loss.is_finite());
    // Every metrics row is readable (no `null` from a NaN).
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(!text.contains("null"), "{text}");
    assert_eq!(
        read(&out.join("metrics.jsonl")).unwrap().len(),
        text.lines().count()
    );
}

#[test]
fn skipped_steps_leave_the_weights_finite() {
    let _serial = crate::common::serial();
    let (dir, mut config) = tiny_run("guard-skip", 30);
    blow_up(&mut config);
    config.run.checkpoint_every = 1;
    config.run.on_nonfinite = OnNonFinite::Skip;
    let out = dir.join("run");
    // Such a learning rate leaves nothing worth training: the run gives up or ends, but every
    // checkpoint it wrote holds finite weights (the skipped updates were not applied).
    let _ = train(config.clone(), RunOptions::new(out.clone()));
    let (_, _, model) = latest_model(&out, &config);
    assert_eq!(non_finite_parameters(&model), Vec::new());
}

/// Puts NaN into the first parameter.
struct Poison {
    done: bool,
}

impl ModuleMapper for Poison {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.done {
            return param;
        }
        self.done = true;
        param.map(|tensor| tensor.mul_scalar(f32::NAN))
    }
}

#[test]
fn eval_and_generate_refuse_non_finite_weights() {
    let _serial = crate::common::serial();
    let (dir, config) = tiny_run("guard-nan-weights", 2);
    let out = dir.join("run");
    train(config.clone(), RunOptions::new(out.clone())).unwrap();
    let (folder, tokenizer, model) = latest_model(&out, &config);
    let poisoned = model.map(&mut Poison { done: false });
    let bad = non_finite_parameters(&poisoned);
    assert_eq!(bad.len(), 1, "{bad:?}");
    // A checkpoint of the poisoned model, written whole (its manifest matches).
    let data: checkpoint::DataRecord =
        serde_json::from_str(&std::fs::read_to_string(folder.join(checkpoint::DATA_FILE)).unwrap())
            .unwrap();
    let (state, _) = checkpoint::read_state(&folder).unwrap();
    let state = checkpoint::TrainingState {
        step: state.step + 1,
        ..state
    };
    let optimizer = moe_train::training::optimizer::FusedAdamW::new(0.1).init();
    checkpoint::save(
        &out,
        checkpoint::CheckpointParts {
            model: &poisoned,
            optimizer: &optimizer,
            sharded: &[],
            state: &state,
            config: &config,
            tokenizer: Some(&tokenizer),
            data: Some(&data),
        },
        3,
    )
    .unwrap();
    let message = commands::evaluate(&eval_args(out.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("non-finite weights") && message.contains(&bad[0].0),
        "{message}"
    );
    assert!(
        message.contains("step-00000002"),
        "names the intact one: {message}"
    );
    let message = commands::generate(&GenerateArgs::greedy(
        out,
        "春",
        5,
        moe_train::runtime::backend::BackendChoice::Ndarray,
    ))
    .unwrap_err()
    .to_string();
    assert!(message.contains("non-finite weights"), "{message}");
}

#[test]
fn the_watch_keeps_the_first_non_finite_step_and_counts_the_rest() {
    let device = cpu();
    let mut watch = NonFiniteWatch::new(&device);
    let scalar = |value: f32| Tensor::<1>::from_floats([value], &device);
    let mut keeps = Vec::new();
    for (step, loss, norm) in [
        (1, 2.0, 1.0),
        (2, f32::NAN, 1.0),
        (3, 2.0, f32::INFINITY),
        (4, 2.0, 1.0),
        (5, f32::INFINITY, f32::NAN),
    ] {
        let keep = watch.observe(step, scalar(loss), scalar(norm), true);
        keeps.push(keep.into_scalar::<f64>());
    }
    assert_eq!(keeps, [1.0, 0.0, 0.0, 1.0, 0.0]);
    let report = watch.read();
    let (step, loss, norm) = report.first.unwrap();
    assert_eq!((step, norm), (2, 1.0));
    assert!(loss.is_nan());
    assert_eq!((report.skipped, report.streak), (3, 1));
    // Without the norm (mixed precision), an infinite norm alone is not a bad step.
    let mut watch = NonFiniteWatch::new(&device);
    let keep = watch.observe(1, scalar(2.0), scalar(f32::INFINITY), false);
    assert_eq!(keep.into_scalar::<f64>(), 1.0);
    assert_eq!(watch.read().first, None);
}

#[test]
fn a_spike_is_reported_against_the_running_mean() {
    let mut spikes = SpikeDetector::default();
    let losses = [4.0, 3.8, 3.6, 3.5, 3.4, 3.3, 9.0, 3.2, f64::NAN, 3.1];
    let reported: Vec<usize> = losses
        .iter()
        .enumerate()
        .filter_map(|(i, &loss)| spikes.observe(i, loss).map(|_| i))
        .collect();
    assert_eq!(reported, [6]);
    // Small losses jumping by 1.5x but by less than a nat are noise, not spikes.
    let mut spikes = SpikeDetector::default();
    let small = [0.4, 0.35, 0.3, 0.3, 0.3, 0.3, 0.55, 0.3];
    assert!(small
        .iter()
        .enumerate()
        .all(|(i, &loss)| spikes.observe(i, loss).is_none()));
}

#[test]
fn three_spikes_in_a_row_are_an_explosion_dated_from_the_first() {
    let mut spikes = SpikeDetector::default();
    // Running mean about 3.5; one spike (step 6), a normal loss, then three in a row.
    let losses = [4.0, 3.8, 3.6, 3.5, 3.4, 3.3, 9.0, 3.2, 9.5, 12.0, 30.0];
    let found: Vec<(usize, usize, usize, bool)> = losses
        .iter()
        .enumerate()
        .filter_map(|(step, &loss)| {
            let spike = spikes.observe(step, loss)?;
            Some((step, spike.since, spike.in_a_row, spike.exploded))
        })
        .collect();
    assert_eq!(
        found,
        [
            (6, 6, 1, false),
            (8, 8, 1, false),
            (9, 8, 2, false),
            (10, 8, 3, true)
        ]
    );
    assert_eq!(spikes.trouble_since(), Some(8));
    assert_eq!(spikes.observe(11, 3.0), None);
    assert_eq!(spikes.trouble_since(), None);
}

#[test]
fn a_run_folder_is_owned_by_one_process_and_not_replaced_by_accident() {
    let dir = temp_dir("guard-owned");
    let run = dir.join("run");
    let held = RunDir::claim(&run, Claim::New).unwrap();
    // A second claim (another process would take the same lock) is refused.
    let message = RunDir::claim(&run, Claim::Overwrite)
        .unwrap_err()
        .to_string();
    assert!(message.contains("another burn-moe process"), "{message}");
    drop(held);

    std::fs::create_dir_all(run.join("checkpoints/step-00000010")).unwrap();
    std::fs::create_dir_all(run.join("checkpoints/.step-00000020.partial-77")).unwrap();
    std::fs::write(run.join("latest"), "checkpoints/step-00000010\n").unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{}\n").unwrap();
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    let message = RunDir::claim(&run, Claim::New).unwrap_err().to_string();
    assert!(message.contains("already holds a run"), "{message}");
    {
        let _resumed = RunDir::claim(&run, Claim::Resume).unwrap();
        assert!(!run.join("checkpoints/.step-00000020.partial-77").exists());
        assert!(run.join("checkpoints/step-00000010").exists());
    }
    let _replaced = RunDir::claim(&run, Claim::Overwrite).unwrap();
    assert!(!run.join("latest").exists() && !run.join("checkpoints").exists());
    assert!(!run.join("metrics.jsonl").exists());
    assert!(
        run.join("notes.txt").exists(),
        "files of others are left alone"
    );
}

#[test]
fn resuming_the_log_drops_later_rows_and_a_cut_line() {
    let dir = temp_dir("guard-metrics");
    let row = |step: usize| {
        format!("{{\"kind\":\"eval\",\"step\":{step},\"val_loss\":1.5,\"val_perplexity\":4.5}}")
    };
    let mut text: String = (1..=6).map(|step| row(step) + "\n").collect();
    text.push_str("{\"kind\":\"eval\",\"st"); // cut by a kill
    std::fs::write(dir.join("metrics.jsonl"), &text).unwrap();
    let mut log = MetricsLog::open(&dir, Some(4)).unwrap();
    let rows = read(log.path()).unwrap();
    assert_eq!(rows.iter().map(Row::step).collect::<Vec<_>>(), [1, 2, 3, 4]);
    log.write(&read(log.path()).unwrap()[0]).unwrap();
    let text = std::fs::read_to_string(log.path()).unwrap();
    assert_eq!(text.lines().count(), 5);
    assert!(text.ends_with('\n'));
    assert!(!dir.join(".metrics.jsonl.partial").exists());
}

#[test]
fn the_memory_estimate_counts_the_parameters_and_refuses_with_figures() {
    let mut config = moe_train::config::Preset::Tiny.config();
    config.model.moe.num_experts = 80;
    let model = config.text_model_config(500);
    let built = model.init(&cpu()).unwrap();
    let estimate = moe_train::runtime::memory::estimate(&config, &model);
    assert_eq!(estimate.parameters, built.num_params() as f64);
    // Weights, gradients, two moments and the update's temporary, in f32.
    assert_eq!(estimate.state_bytes, 5.0 * 4.0 * built.num_params() as f64);
    // The logits alone: batch 16 x context 64 tokens x 500 x 3 copies x 4 bytes.
    assert!(estimate.activation_bytes > 16.0 * 64.0 * 500.0 * 3.0 * 4.0);
    let backend = moe_train::runtime::backend::BackendChoice::Flex;
    moe_train::runtime::memory::check_against(&config, &model, backend, 1e12).unwrap();
    let message = moe_train::runtime::memory::check_against(&config, &model, backend, 1e6)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("not enough memory") && message.contains("1.0 MB is available"),
        "{message}"
    );
}

#[test]
fn an_adapter_whose_buffers_are_too_small_is_refused_with_figures() {
    use moe_train::runtime::backend::AdapterLimits;
    let config = moe_train::config::Preset::Tiny.config();
    let model = config.text_model_config(4500);
    // The tiny preset's largest tensor: the logits, 16 x 64 tokens x 4,500 classes x 4 bytes
    // (the expert buffer is 16,384 rows x 128 = 2.1 M values, the logits 4.6 M).
    let (bytes, what) = moe_train::runtime::memory::largest_tensor_bytes(&config, &model);
    assert_eq!(what, "the logits");
    assert_eq!(bytes, 16.0 * 64.0 * 4500.0 * 4.0);
    let limits = |buffer: u64| AdapterLimits {
        compiler: "wgpu<spirv>".into(),
        driver: "test".into(),
        workgroup_memory: 16_384,
        invocations_per_workgroup: 256,
        storage_binding: buffer,
        buffer,
        shader_f16: false,
        is_cpu: false,
    };
    moe_train::runtime::memory::check_adapter(&config, &model, "a GPU", &limits(1 << 30)).unwrap();
    // With 4,096 experts of width 32 the stacked expert weights are the largest (4,096 x 128 x
    // 32 x 4 bytes, 67 MB); `--offload-experts` keeps them off the GPU, so the logits are.
    let mut wide = config.clone();
    wide.model.moe.num_experts = 4096;
    let wide_model = wide.text_model_config(4500);
    let (bytes, what) = moe_train::runtime::memory::largest_tensor_bytes(&wide, &wide_model);
    assert_eq!(
        (what.as_str(), bytes),
        ("one stacked expert weight", 4096.0 * 128.0 * 32.0 * 4.0)
    );
    let message =
        moe_train::runtime::memory::check_adapter(&wide, &wide_model, "a GPU", &limits(1 << 25))
            .unwrap_err()
            .to_string();
    assert!(message.contains("--offload-experts"), "{message}");
    wide.run.offload_experts = true;
    let (bytes, what) = moe_train::runtime::memory::largest_tensor_bytes(&wide, &wide_model);
    assert_eq!(
        (what.as_str(), bytes),
        ("the logits", 16.0 * 64.0 * 4500.0 * 4.0)
    );
    let message =
        moe_train::runtime::memory::check_adapter(&config, &model, "a GPU", &limits(1 << 20))
            .unwrap_err()
            .to_string();
    assert!(
        message.contains("the logits of a step (18.4 MB")
            && message.contains("allows (1.0 MB)")
            && message.contains("--batch-size"),
        "{message}"
    );
    // Workgroups smaller than the kernels' are refused before anything runs.
    let mut small = limits(1 << 30);
    small.invocations_per_workgroup = 128;
    let message = small.check_kernels("a GPU").unwrap_err().to_string();
    assert!(
        message.contains("128 invocations per workgroup") && message.contains("launches 256"),
        "{message}"
    );
    small.invocations_per_workgroup = 256;
    small.workgroup_memory = 4096;
    let message = small.check_kernels("a GPU").unwrap_err().to_string();
    assert!(
        message.contains("4096 bytes of workgroup memory"),
        "{message}"
    );
}
