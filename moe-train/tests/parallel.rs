//! Training on several devices: two local CPU backends together, and Burn remote servers
//! started with `burn-moe serve` on 127.0.0.1, each against one local device.
//!
//! The references are runs on one device: expert parallelism must give the one-device run's
//! losses; splitting each micro-batch over `n` devices must give the one-device run that
//! accumulates `n` micro-batches of the slice's size (the same examples, averaged gradients).

#[path = "train/common.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Distribution, Tensor};
use common::tiny_run;
use moe_core::placement::ExpertPlacement;
use moe_core::{CapacityConfig, ExpertConfig, GateConfig, MoeConfig};
use moe_train::config::TrainConfig;
use moe_train::runtime::backend::BackendChoice;
use moe_train::store::checkpoint;
use moe_train::training::parallel::Parallelism;
use moe_train::training::replicas::ReducePrecision;
use moe_train::training::{train, RunOptions, RunSummary, StepHook};

const PROGRAM: &str = env!("CARGO_BIN_EXE_burn-moe");
const TOKEN: &str = "loopback-test-token";

/// A `burn-moe serve` child process on 127.0.0.1 serving flex; killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(token: Option<&str>) -> Server {
        let mut command = Command::new(PROGRAM);
        command.args([
            "serve",
            "--port",
            "0",
            "--host",
            "127.0.0.1",
            "--backend",
            "flex",
        ]);
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        let mut child = command
            .env_remove("BURN_MOE_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("burn-moe serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .last()
            .filter(|word| word.starts_with("ws://"))
            .unwrap_or_else(|| panic!("the server's first line names its address: {line:?}"))
            .to_string();
        Server { child, url }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The tiny text config on flex, with a gate that draws no noise (so that slices on other
/// devices draw nothing from their generators) and no dropout.
fn config(name: &str, steps: usize) -> (common::TempDir, TrainConfig) {
    let (dir, mut config) = tiny_run(name, steps);
    config.run.backend = BackendChoice::Flex;
    config.model.moe.gate = moe_core::GateConfig::softmax_top_k();
    config.optim.batch_size = 6;
    (dir, config)
}

/// `config` on one device, accumulating `slices` micro-batches of a slice's size: what a
/// batch split over `slices` devices must train like. Validation reads `batch_size x
/// eval_batches` windows, so it reads as many as the split run does.
fn accumulating(config: &TrainConfig, slices: usize) -> TrainConfig {
    let mut accumulated = config.clone();
    accumulated.optim.batch_size = config.optim.batch_size / slices;
    accumulated.optim.grad_accum = slices;
    accumulated.run.eval_batches *= slices;
    accumulated
}

/// Checks that the runs in `a` and `b` ended at the same validation loss and weights.
fn assert_same_model(a: (&RunSummary, &Path), b: (&RunSummary, &Path), what: &str) {
    let (loss_a, loss_b) = (
        a.0.val_losses.last().unwrap().1,
        b.0.val_losses.last().unwrap().1,
    );
    assert!(
        (loss_a - loss_b).abs() < 1e-4,
        "{what}: validation {loss_a} vs {loss_b}"
    );
    let gap = weight_gap(a.1, b.1);
    assert!(gap < 1e-4, "{what}: weights differ by {gap}");
}

fn on(config: &TrainConfig, devices: &[&str], parallel: Parallelism) -> TrainConfig {
    let mut config = config.clone();
    config.run.devices = devices.iter().map(|d| d.to_string()).collect();
    config.run.parallel = parallel;
    config
}

fn options(out: &Path) -> RunOptions {
    RunOptions {
        remote_token: Some(TOKEN.into()),
        compare_replicas: true,
        ..RunOptions::new(out)
    }
}

fn run(config: TrainConfig, out: &Path) -> RunSummary {
    train(config, options(out)).unwrap()
}

/// Largest difference between two runs' training and validation losses.
fn loss_gap(a: &RunSummary, b: &RunSummary) -> f64 {
    assert_eq!(a.train_losses.len(), b.train_losses.len());
    assert_eq!(a.val_losses.len(), b.val_losses.len());
    let pairs = a.train_losses.iter().zip(&b.train_losses);
    let vals = a.val_losses.iter().zip(&b.val_losses);
    pairs
        .chain(vals)
        .map(|((step_a, a), (step_b, b))| {
            assert_eq!(step_a, step_b);
            (a - b).abs()
        })
        .fold(0.0, f64::max)
}

/// Every parameter of a module, by id, as host values.
struct Values(Vec<(ParamId, Vec<f32>)>);

impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap();
        self.0.push((param.id, values));
    }
}

/// The largest difference between the weights of two checkpoints' models.
fn weight_gap(a: &Path, b: &Path) -> f64 {
    let weights = |run: &Path| {
        let opened = checkpoint::open(run, moe_train::store::checkpoint::Verify::Checked).unwrap();
        let tokenizer = moe_train::data::tokenizer::Tokenizer::load(
            &opened.folder.join(checkpoint::TOKENIZER_FILE),
        )
        .unwrap();
        let device = Device::flex();
        let model = moe_train::data::tasks::text::text_model(
            &opened.config,
            tokenizer.vocab_size(),
            &device,
            false,
        )
        .unwrap();
        let model = checkpoint::load_model(&opened.folder, model).unwrap();
        let mut values = Values(Vec::new());
        model.visit(&mut values);
        values.0
    };
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64))
        .fold(0.0, f64::max)
}

#[test]
fn experts_on_two_backends_train_as_on_one() {
    let _serial = common::serial();
    let (dir, config) = config("parallel-experts", 8);
    let one = run(config.clone(), &dir.join("one"));
    let two = run(
        on(&config, &["flex", "ndarray"], Parallelism::Experts),
        &dir.join("two"),
    );
    let gap = loss_gap(&one, &two);
    assert!(gap < 1e-4, "losses differ by {gap}");
    // The placed run's checkpoint loads into the one-device model: its experts are gathered.
    assert!(weight_gap(&dir.join("one"), &dir.join("two")) < 1e-4);
    assert!(
        one.train_losses.last().unwrap().1 < one.train_losses[0].1,
        "it trains"
    );
}

#[test]
fn a_batch_split_over_devices_trains_as_accumulated_slices() {
    let _serial = common::serial();
    let (dir, config) = config("parallel-data", 6);
    let one = run(accumulating(&config, 2), &dir.join("one"));
    for parallel in [Parallelism::Data, Parallelism::Both] {
        let out = dir.join(format!("two-{parallel:?}"));
        let two = run(on(&config, &["flex", "ndarray"], parallel), &out);
        assert_same_model((&one, &dir.join("one")), (&two, &out), parallel.name());
        // Two backends apply the same update to the same summed gradients.
        let report = two.data_parallel.expect("a data-parallel run");
        let gap = report.replica_gap.expect("compared");
        assert!(
            gap < 1e-6,
            "{}: the replicas differ by {gap}",
            parallel.name()
        );
    }
}

#[test]
fn checkpoints_resume_on_another_number_of_devices() {
    let _serial = common::serial();
    let (dir, config) = config("parallel-resume", 8);
    let mut config = config;
    config.run.checkpoint_every = 4;
    let whole = run(config.clone(), &dir.join("whole"));
    // The same run data parallel on two devices (the losses it logs are the mean over its
    // slices, where an accumulating run logs its last micro-batch's).
    let data_devices = ["flex", "ndarray"];
    let whole_data = run(
        on(&config, &data_devices, Parallelism::Data),
        &dir.join("whole-data"),
    );
    let stop_at_4 = |config: TrainConfig, out: &Path| {
        let options = RunOptions {
            stop_after: Some(4),
            ..options(out)
        };
        assert!(train(config, options).unwrap().interrupted);
    };
    let resume = |config: TrainConfig, out: &Path| {
        train(
            config,
            RunOptions {
                resume: true,
                ..options(out)
            },
        )
        .unwrap()
    };
    // Two devices, then one; one, then two others; data parallel on two devices before and
    // after (the replicas' optimizers start from the checkpoint's state: fresh ones would
    // train otherwise).
    let (experts, data) = (Parallelism::Experts, Parallelism::Data);
    for (name, before, after, parallel) in [
        ("2-1", vec!["flex", "ndarray"], vec!["local"], experts),
        ("1-2", vec!["local"], vec!["ndarray", "flex"], experts),
        (
            "2-2-data",
            data_devices.to_vec(),
            data_devices.to_vec(),
            data,
        ),
    ] {
        let (whole, whole_dir) = match parallel {
            Parallelism::Data => (&whole_data, dir.join("whole-data")),
            _ => (&whole, dir.join("whole")),
        };
        let out = dir.join(name);
        stop_at_4(on(&config, &before, parallel), &out);
        let second = resume(on(&config, &after, parallel), &out);
        let gap = whole.train_losses[4..]
            .iter()
            .zip(&second.train_losses)
            .map(|((_, a), (_, b))| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(gap < 1e-4, "{name}: the resumed losses differ by {gap}");
        assert!(weight_gap(&whole_dir, &out) < 1e-4, "{name}");
    }
}

/// Output and gradients of one MoE layer with its experts on two loopback servers and the
/// local device, against the same layer on the local device alone.
#[test]
fn an_expert_parallel_layer_over_loopback_servers_matches_one_device() {
    let _serial = common::serial();
    let servers = [Server::start(Some(TOKEN)), Server::start(Some(TOKEN))];
    let connect = |server: &Server| {
        moe_train::training::parallel::connect(&server.url, Some(TOKEN))
            .unwrap()
            .autodiff()
    };
    let home = Device::flex().autodiff();
    let devices = vec![home.clone(), connect(&servers[0]), connect(&servers[1])];
    home.seed(11);
    for dropless in [false, true] {
        let capacity = match dropless {
            true => CapacityConfig::new().with_dropless(true),
            false => CapacityConfig::new().with_train_factor(1.0),
        };
        let config = MoeConfig::new(8, 6, ExpertConfig::new(12))
            .with_top_k(2)
            .with_gate(GateConfig::softmax_top_k())
            .with_capacity(capacity);
        let layer = config.init(&home).unwrap();
        let placed = layer
            .clone()
            .with_placement(ExpertPlacement::even(6, devices.clone()).unwrap())
            .unwrap();
        let x = Tensor::<2>::random([20, 8], Distribution::Normal(0.0, 1.0), &home).require_grad();
        let weights = Tensor::<2>::random([20, 8], Distribution::Default, &home);
        let gradients = |layer: &moe_core::Moe| {
            let out = layer.forward(x.clone());
            let loss = (out.output.clone() * weights.clone()).sum() + out.aux_loss;
            let grads = loss.backward();
            let values = |t: Tensor<2>| t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            (
                values(out.output.without_autodiff()),
                values(x.grad(&grads).unwrap()),
                values(layer.router.weight.grad(&grads).unwrap()),
            )
        };
        let (one, placed) = (gradients(&layer), gradients(&placed));
        for (what, a, b) in [
            ("output", &one.0, &placed.0),
            ("input gradient", &one.1, &placed.1),
            ("router gradient", &one.2, &placed.2),
        ] {
            let gap = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(gap < 1e-5, "dropless {dropless}: {what} differs by {gap}");
        }
    }
}

/// Ten steps over the local device and two loopback servers (experts spread, each
/// micro-batch split in three) against one local device accumulating three slices.
#[test]
fn ten_steps_over_loopback_servers_match_one_device() {
    let _serial = common::serial();
    let servers = [Server::start(Some(TOKEN)), Server::start(Some(TOKEN))];
    let (_dir, _, three) = three_against_one(&servers, "parallel-loopback", 10, Parallelism::Both);
    let report = three.data_parallel.expect("a data-parallel run reports");
    assert_eq!(report.replica_gap, Some(0.0), "the replicas drifted apart");
    // The placed experts are not replicated: the all-reduce sums the rest.
    assert!(report.replicated_values < three.parameters.0);
}

/// Data parallelism over the local device and two loopback servers: the replicas end the run
/// with the first device's weights bit for bit, the run trains as one device accumulating
/// three slices, and each device sends and receives what a reduce-scatter and all-gather of
/// every gradient move: `2 (N - 1) / N` times the parameters' bytes per step, against
/// `2 (N - 1)` times for the first device when it broadcast the weights and gathered the
/// gradients (a parameter server).
#[test]
fn replicas_over_loopback_servers_stay_identical_and_move_an_all_reduce() {
    let _serial = common::serial();
    let servers = [Server::start(Some(TOKEN)), Server::start(Some(TOKEN))];
    let steps = 6;
    let (dir, config, three) =
        three_against_one(&servers, "parallel-replicas", steps, Parallelism::Data);
    let devices = loopback_devices(&servers);
    assert_all_reduce(&three, devices.len(), steps, 4);
    // In bf16 the gradients travel in half the bytes, the replicas still agree bit for bit,
    // and the run stays near the f32 one (each gradient rounded to bf16's 8 significant bits).
    let mut bf16 = on(&config, &devices, Parallelism::Data);
    bf16.run.all_reduce = ReducePrecision::Bf16;
    let halved = run(bf16, &dir.join("bf16"));
    assert_all_reduce(&halved, devices.len(), steps, 2);
    let gap = loss_gap(&three, &halved);
    // Measured: 1.5e-5 over 6 steps.
    assert!(gap < 1e-3, "bf16 all-reduce: losses {gap} from f32's");
    assert!(gap > 0.0, "bf16 all-reduce: the gradients were not rounded");
}

/// The local device and the two `servers`.
fn loopback_devices(servers: &[Server; 2]) -> [&str; 3] {
    ["local", servers[0].url.as_str(), servers[1].url.as_str()]
}

/// A run of `steps` steps over the local device and the two `servers` (`parallel`), checked
/// against one local device accumulating three slices (validation loss and weights within
/// 1e-4); returns its folder, its config on one device and its summary.
fn three_against_one(
    servers: &[Server; 2],
    name: &str,
    steps: usize,
    parallel: Parallelism,
) -> (common::TempDir, TrainConfig, RunSummary) {
    let (dir, config) = config(name, steps);
    let one = run(accumulating(&config, 3), &dir.join("one"));
    let devices = loopback_devices(servers);
    let three = run(on(&config, &devices, parallel), &dir.join("three"));
    assert_same_model((&one, &dir.join("one")), (&three, &dir.join("three")), name);
    (dir, config, three)
}

/// Checks a data-parallel run of `steps` steps on `devices` devices, every parameter
/// replicated: its replicas ended identical, and each device sent and received
/// `2 (N - 1) / N` of the gradients' bytes (`bytes` a value) per step.
fn assert_all_reduce(summary: &RunSummary, devices: usize, steps: usize, bytes: usize) {
    let report = summary
        .data_parallel
        .as_ref()
        .expect("a data-parallel run reports");
    assert_eq!(report.replica_gap, Some(0.0), "the replicas drifted apart");
    // Every parameter of the tiny model is trained and replicated (no expert is placed).
    let values = summary.parameters.0 as f64;
    assert_eq!(report.replicated_values, summary.parameters.0);
    assert_eq!(report.ledger.reductions, steps as u64);
    let (n, b) = (devices as f64, bytes as f64);
    let expected = 2.0 * (n - 1.0) / n * values * b * steps as f64;
    for (device, (&sent, &received)) in report
        .ledger
        .sent
        .iter()
        .zip(&report.ledger.received)
        .enumerate()
    {
        for (what, counted) in [("sent", sent), ("received", received)] {
            // Shards differ in length by one value at most.
            let slack = b * n * steps as f64;
            assert!(
                (counted as f64 - expected).abs() <= slack,
                "device {device} {what} {counted} bytes, the formula says {expected}"
            );
        }
    }
}

/// A server killed in the middle of a run: the run stops within a bounded time with an error
/// naming it, the last checkpoint is intact, and the run resumes on the local device alone.
#[test]
fn a_server_that_dies_is_named_and_the_run_resumes_without_it() {
    let _serial = common::serial();
    let server = Arc::new(Mutex::new(Server::start(Some(TOKEN))));
    let url = server.lock().unwrap().url.clone();
    let (dir, config) = config("parallel-failure", 12);
    let mut config = on(&config, &["local", &url], Parallelism::Both);
    config.run.checkpoint_every = 2;
    let out = dir.join("run");
    let killer = server.clone();
    let options = RunOptions {
        on_step: Some(StepHook(Arc::new(move |step| {
            if step == 5 {
                killer.lock().unwrap().stop();
            }
        }))),
        ..options(&out)
    };
    let started = Instant::now();
    let (sender, receiver) = std::sync::mpsc::channel();
    let run_config = config.clone();
    std::thread::spawn(move || {
        let _ = sender.send(train(run_config, options).map(|summary| summary.last_step));
    });
    let result = receiver
        .recv_timeout(Duration::from_secs(120))
        .expect("the run stops within two minutes of the server dying");
    let error = result
        .expect_err("the run fails once its server is gone")
        .to_string();
    assert!(error.contains(&url), "the error names the server: {error}");
    eprintln!(
        "stopped after {:.1} s: {error}",
        started.elapsed().as_secs_f64()
    );
    let latest = checkpoint::resolve(&out).unwrap();
    checkpoint::verify(&latest).unwrap();
    config.run.devices = vec!["local".into()];
    let resumed = train(
        config,
        RunOptions {
            resume: true,
            ..RunOptions::new(&out)
        },
    )
    .unwrap();
    assert_eq!(resumed.last_step, 12);
}

#[test]
fn unreachable_servers_and_wrong_tokens_are_named() {
    let _serial = common::serial();
    let (dir, config) = config("parallel-unreachable", 2);
    // A port bound but not listening: every dial is refused.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    drop(socket);
    let url = format!("ws://127.0.0.1:{port}");
    let started = Instant::now();
    let error = train(
        on(&config, &["local", &url], Parallelism::Both),
        options(&dir.join("unreachable")),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains(&url) && error.contains("could not connect"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(120));

    let server = Server::start(Some(TOKEN));
    let error = train(
        on(&config, &["local", &server.url], Parallelism::Both),
        RunOptions {
            remote_token: Some("wrong".into()),
            ..RunOptions::new(dir.join("token"))
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains(&server.url) && error.contains("token"),
        "{error}"
    );
}
