//! Kills the trainer with SIGKILL at 20 random moments (while it starts or resumes, trains, and
//! writes checkpoints) and resumes it each time. After every kill the run folder must hold an
//! intact latest checkpoint (when one was written) and the metrics of every step up to it,
//! equal to an uninterrupted run's; at the end the resumed run's losses must equal the
//! uninterrupted run's exactly (the CPU backends are deterministic).

#[path = "train/common.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use moe_core::rng::SplitMix64;
use moe_train::store::checkpoint;
use moe_train::store::metrics::{read, Row};

const PROGRAM: &str = env!("CARGO_BIN_EXE_burn-moe");
const STEPS: usize = 60;
const KILLS: usize = 20;

/// Checkpoints every other step, so that many kills land in a checkpoint write.
const CONFIG: &str = "[model]\nd_model = 32\nnum_layers = 2\nnum_heads = 2\ncontext_length = 16\nd_ff = 64\nmoe_every = 2\n\n[model.moe]\nnum_experts = 4\ntop_k = 2\nexpert.d_hidden = 32\ncapacity.dropless = false\n\n[optim]\nbatch_size = 8\nwarmup_steps = 5\n\n[run]\nlog_every = 1\neval_every = 10\neval_batches = 2\ncheckpoint_every = 2\nkeep_checkpoints = 2\nsamples = 0\n";

fn command(dir: &Path, out: &Path, resume: bool) -> Command {
    let mut command = Command::new(PROGRAM);
    command
        .arg("train")
        .args(["--backend", "ndarray", "--steps", &STEPS.to_string()])
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if resume {
        command.arg("--resume");
    } else {
        command
            .arg("--text")
            .arg(dir.join("corpus.txt"))
            .arg("--config")
            .arg(dir.join("run.toml"))
            .arg("--overwrite");
    }
    command
}

/// The metrics rows of `out` up to `step`.
fn rows_up_to(out: &Path, step: usize) -> Vec<Row> {
    read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|row| row.step() <= step)
        .collect()
}

/// The parts of a row that must repeat exactly (not the throughput).
fn losses(rows: &[Row]) -> Vec<(usize, u64, u64)> {
    rows.iter()
        .map(|row| match row {
            Row::Train(row) => (row.step, row.loss.to_bits(), row.grad_norm.to_bits()),
            Row::Eval(row) => (row.step, row.val_loss.to_bits(), 0),
        })
        .collect()
}

/// Whether a checkpoint (or `latest`, or the metrics) is being written in `out`: a staging
/// file or folder exists.
fn has_partial(out: &Path) -> bool {
    [out.join("checkpoints"), out.to_path_buf()]
        .iter()
        .any(|folder| {
            std::fs::read_dir(folder).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|entry| entry.file_name().to_string_lossy().contains(".partial"))
            })
        })
}

/// Kills the run in `out` after random delays, checking it after each kill, until it finishes
/// on its own or `budget` kills are spent; returns the kills made and how many left a partial
/// write behind.
fn kill_repeatedly(
    dir: &Path,
    out: &Path,
    reference: &[(usize, u64, u64)],
    budget: usize,
    delay_limit: Duration,
    rng: &mut SplitMix64,
) -> (usize, usize) {
    let (mut kills, mut in_writes) = (0, 0);
    while kills < budget {
        let resume = moe_train::store::run_dir::holds_run(out);
        let mut child = command(dir, out, resume).spawn().unwrap();
        let limit = delay_limit.as_micros() as usize;
        match kills % 3 {
            // Early: while the process starts or resumes.
            0 => std::thread::sleep(Duration::from_micros(rng.below(limit / 8 + 1) as u64)),
            // In a checkpoint write: as soon as its staging folder shows up.
            1 => {
                let started = Instant::now();
                while !has_partial(out) && started.elapsed() < delay_limit * 4 {
                    std::thread::yield_now();
                }
            }
            // Anywhere in a stretch of training short enough that the run still progresses
            // by a few steps per kill.
            _ => std::thread::sleep(Duration::from_micros(rng.below(limit + 1) as u64)),
        }
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap();
        child.wait().unwrap();
        if finished {
            break;
        }
        kills += 1;
        let partial = has_partial(out);
        in_writes += usize::from(partial);
        if !moe_train::store::run_dir::holds_run(out) {
            continue;
        }
        let opened = checkpoint::open(out, moe_train::store::checkpoint::Verify::Checked)
            .unwrap_or_else(|error| {
                panic!("after a kill the latest checkpoint is broken: {error}")
            });
        let step = opened.state.step;
        let expected: Vec<_> = reference
            .iter()
            .filter(|(row_step, _, _)| *row_step <= step)
            .cloned()
            .collect();
        assert_eq!(
            losses(&rows_up_to(out, step)),
            expected,
            "after a kill (checkpoint at step {step}) the metrics up to it differ"
        );
    }
    (kills, in_writes)
}

#[test]
fn sigkill_at_random_moments_loses_nothing_before_the_last_checkpoint() {
    let dir = common::temp_dir("crash");
    common::write_generated_corpus(&dir.join("corpus.txt"));
    std::fs::write(dir.join("run.toml"), CONFIG).unwrap();

    let whole = dir.join("whole");
    let started = Instant::now();
    let status = command(&dir, &whole, false).status().unwrap();
    assert!(status.success());
    let duration = started.elapsed();
    let rows = read(&whole.join("metrics.jsonl")).unwrap();
    let train_rows = rows
        .iter()
        .filter(|row| matches!(row, Row::Train(_)))
        .count();
    assert_eq!(train_rows, STEPS);
    let reference = losses(&rows);

    let mut rng = SplitMix64(2026);
    let (mut kills, mut in_writes, mut sequence) = (0, 0, 0);
    while kills < KILLS {
        let out = dir.join(format!("killed-{sequence}"));
        let (made, partial) = kill_repeatedly(
            &dir,
            &out,
            &reference,
            KILLS - kills,
            duration / 6,
            &mut rng,
        );
        kills += made;
        in_writes += partial;
        // Finish the run and compare it whole.
        let status = command(&dir, &out, moe_train::store::run_dir::holds_run(&out))
            .status()
            .unwrap();
        assert!(status.success());
        let resumed = losses(&read(&out.join("metrics.jsonl")).unwrap());
        assert_eq!(
            resumed, reference,
            "the resumed run's losses differ from the uninterrupted run's"
        );
        let leftovers: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().to_string())
            .filter(|name| name.contains(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "partial writes left: {leftovers:?}");
        sequence += 1;
    }
    println!("{kills} kills over {sequence} run(s); {in_writes} left a partial write behind");
}
