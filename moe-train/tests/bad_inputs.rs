//! A table of bad inputs to the `burn-moe` program: command lines, config files, corpora,
//! checkpoint folders and prompts. Each runs the real binary and must exit with the status
//! given (1: an error of ours, 2: the command line's parser, 3: training diverged) and a
//! message holding every fragment given, which names the problem; none may panic.

#[path = "train/common.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::write_generated_corpus;

/// The program under test.
const PROGRAM: &str = env!("CARGO_BIN_EXE_burn-moe");

/// The shape the fixture's runs train: small enough that a run of a few steps takes well under a
/// second on the CPU.
const TINY_TOML: &str = "[model]\nd_model = 32\nnum_layers = 2\nnum_heads = 2\ncontext_length = 16\nd_ff = 64\nmoe_every = 2\n\n[model.moe]\nnum_experts = 4\ntop_k = 2\nexpert.d_hidden = 32\ncapacity.dropless = false\n\n[optim]\nbatch_size = 8\nwarmup_steps = 2\n\n[run]\nsteps = 4\nlog_every = 1\neval_every = 4\neval_batches = 2\ncheckpoint_every = 2\nsamples = 0\n";

/// The Qwen2-MoE fixture folder (a Hugging Face model to fine-tune).
const QWEN2_MOE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/hf/qwen2_moe"
);

/// One bad input.
struct Case {
    name: &'static str,
    /// Arguments; `{dir}` is the case's own folder, `{fix}` the shared fixture folder.
    args: Vec<&'static str>,
    /// What to set up in the case's folder first.
    prepare: Option<fn(&Path, &Path)>,
    code: i32,
    expect: Vec<&'static str>,
}

fn case(name: &'static str, args: &[&'static str], code: i32, expect: &[&'static str]) -> Case {
    Case {
        name,
        args: args.to_vec(),
        prepare: None,
        code,
        expect: expect.to_vec(),
    }
}

impl Case {
    fn prepared(mut self, prepare: fn(&Path, &Path)) -> Self {
        self.prepare = Some(prepare);
        self
    }
}

/// `train` on the fixture's corpus and shape, into the case's folder, plus `extra`.
fn train(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec![
        "train",
        "--text",
        "{fix}/corpus.txt",
        "--config",
        "{fix}/tiny.toml",
        "--backend",
        "flex",
        "--out",
        "{dir}/run",
    ];
    args.extend_from_slice(extra);
    args
}

/// A config file `{dir}/bad.toml` with `body` (over the fixture's shape).
fn config_case(name: &'static str, prepare: fn(&Path, &Path), expect: &[&'static str]) -> Case {
    let args = [
        "train",
        "--text",
        "{fix}/corpus.txt",
        "--config",
        "{dir}/bad.toml",
        "--backend",
        "flex",
        "--out",
        "{dir}/run",
    ];
    case(name, &args, 1, expect).prepared(prepare)
}

fn write_config(dir: &Path, extra: &str) {
    std::fs::write(dir.join("bad.toml"), format!("{TINY_TOML}\n{extra}")).unwrap();
}

/// A copy of the fixture's trained run in `{dir}/run`.
fn copy_run(dir: &Path, fixture: &Path) {
    copy_dir(&fixture.join("run"), &dir.join("run"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A folder `{dir}/run` of the user's own files, named as a run's are.
fn users_files(dir: &Path, _: &Path) {
    std::fs::create_dir_all(dir.join("run")).unwrap();
    for name in ["config.json", "metrics.jsonl", "loss.png"] {
        std::fs::write(dir.join("run").join(name), "mine").unwrap();
    }
}

/// Makes the copied run's newest checkpoint one with no checksums, as an older burn-moe wrote
/// them (no manifest, none recorded in `state.json`); returns its folder.
fn without_checksums(dir: &Path) -> PathBuf {
    let folder = newest(dir);
    std::fs::remove_file(folder.join("manifest.json")).unwrap();
    let path = folder.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("files");
    std::fs::write(&path, serde_json::to_string(&state).unwrap()).unwrap();
    folder
}

/// The newest checkpoint folder of the copied run.
fn newest(dir: &Path) -> PathBuf {
    let latest = std::fs::read_to_string(dir.join("run/latest")).unwrap();
    dir.join("run").join(latest.trim())
}

fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

/// Every bad input with the exit status and the words its message must hold: a table, one
/// row per case, long by design (the suite asserts it keeps at least 150 rows).
fn cases() -> Vec<Case> {
    let eval = |extra: &'static str| -> Vec<&'static str> {
        vec!["eval", "--checkpoint", extra, "--backend", "flex"]
    };
    let generate = |extra: &[&'static str]| -> Vec<&'static str> {
        let mut args = vec!["generate", "--checkpoint", "{fix}/run", "--backend", "flex"];
        args.extend_from_slice(extra);
        args
    };
    vec![
        // Flags out of range.
        case("zero steps", &train(&["--steps", "0"]), 1, &["run.steps", "got 0"]),
        case("zero batch", &train(&["--batch-size", "0"]), 1, &["optim.batch_size"]),
        case("zero accumulation", &train(&["--grad-accum", "0"]), 1, &["optim.grad_accum"]),
        case("zero lr", &train(&["--lr", "0"]), 1, &["optim.lr", "got 0"]),
        case("negative lr", &train(&["--lr=-1"]), 1, &["optim.lr", "-1"]),
        case("NaN lr", &train(&["--lr", "NaN"]), 1, &["optim.lr", "NaN"]),
        case("infinite lr", &train(&["--lr", "inf"]), 1, &["optim.lr", "inf"]),
        case("negative clipping", &train(&["--grad-clip=-1"]), 1, &["optim.grad_clip"]),
        case("no experts", &train(&["--experts", "0"]), 1, &["model.moe.num_experts", "--experts", "got 0"]),
        case("top-k zero", &train(&["--top-k", "0"]), 1, &["model.moe.top_k", "--top-k"]),
        case("top-k above experts", &train(&["--experts", "4", "--top-k", "5"]), 1, &["model.moe.top_k", "--top-k", "(5)", "cannot exceed", "model.moe.num_experts", "(4)"]),
        case("zero context", &train(&["--context", "0"]), 1, &["model.context_length", "--context"]),
        case("huge context", &train(&["--context", "5000000"]), 1, &["model.context_length", "--context", "5000000"]),
        // LoRA settings.
        case("LoRA without a base", &train(&["--lora-rank", "4"]), 2, &["--init-hf"]),
        case("LoRA rank zero", &train(&["--init-hf", QWEN2_MOE, "--lora-rank", "0"]), 1, &["lora.rank", "got 0"]),
        case("LoRA rank above the weights' sides", &train(&["--init-hf", QWEN2_MOE, "--lora-rank", "100000"]), 1, &["--lora-rank", "100000", "attention projections", "at most 48"]),
        case("LoRA rank above the expert count", &train(&["--init-hf", QWEN2_MOE, "--lora-rank", "16", "--lora-targets", "router"]), 1, &["--lora-rank", "routers", "at most 8"]),
        case("LoRA alpha negative", &train(&["--init-hf", QWEN2_MOE, "--lora-rank", "4", "--lora-alpha=-2"]), 1, &["lora.alpha", "-2"]),
        case("held weights without LoRA", &train(&["--init-hf", QWEN2_MOE, "--weights", "q4"]), 1, &["--weights", "--lora-rank"]),
        case("held weights without a base", &train(&["--weights", "q4"]), 2, &["--weights", "--init-hf"]),
        case("PEFT adapters that are not there", &train(&["--init-hf", QWEN2_MOE, "--init-lora", "{dir}/nothing"]), 1, &["nothing", "adapter_config.json"]),
        case("PEFT adapters beside a rank", &train(&["--init-hf", QWEN2_MOE, "--init-lora", "{dir}", "--lora-rank", "4"]), 2, &["--init-lora", "--lora-rank"]),
        case("QLoRA in bf16 on a backend without bf16", &["train", "--text", "{fix}/corpus.txt", "--config", "{fix}/tiny.toml", "--backend", "ndarray", "--out", "{dir}/run", "--init-hf", QWEN2_MOE, "--lora-rank", "4", "--weights", "bf16"], 1, &["cannot hold weights in bf16", "flex"]),
        case("QLoRA in 4 bits on a backend without quantized products", &["train", "--text", "{fix}/corpus.txt", "--config", "{fix}/tiny.toml", "--backend", "ndarray", "--out", "{dir}/run", "--init-hf", QWEN2_MOE, "--lora-rank", "4", "--weights", "q4"], 1, &["cannot multiply by weights in q4", "flex", "wgpu"]),
        case("LoRA unknown target", &train(&["--init-hf", QWEN2_MOE, "--lora-rank", "4", "--lora-targets", "attention,embeddings"]), 2, &["embeddings", "attention, router, experts"]),
        // Devices.
        case("unknown device", &train(&["--devices", "local,gpu7"]), 1, &["gpu7", "ws://host:port"]),
        case("server without a port", &train(&["--devices", "local,ws://box"]), 1, &["ws://box", "a host and a port"]),
        case("one device twice", &train(&["--devices", "flex,local"]), 1, &["twice", "`flex` and `local`"]),
        case("batch that does not split", &train(&["--devices", "flex,ndarray", "--batch-size", "3"]), 1, &["--batch-size", "does not divide by 2", "--parallel experts"]),
        case("more devices than experts", &train(&["--devices", "flex,ndarray,ws://127.0.0.1:9", "--experts", "2", "--top-k", "1", "--batch-size", "6"]), 1, &["2 experts", "3 devices", "--parallel data"]),
        case("server that is not there", &train(&["--devices", "local,ws://127.0.0.1:9"]), 1, &["ws://127.0.0.1:9", "could not connect", "burn-moe serve"]),
        case("negative balance weight", &train(&["--aux-loss-weight=-1"]), 1, &["model.moe.losses.balance_weight", "--aux-loss-weight"]),
        case("NaN balance weight", &train(&["--aux-loss-weight", "nan"]), 1, &["model.moe.losses.balance_weight", "--aux-loss-weight"]),
        case("bf16 all-reduce on ndarray", &train(&["--devices", "flex,ndarray", "--parallel", "data", "--all-reduce", "bf16"]), 1, &["--all-reduce bf16", "device 2", "--all-reduce f32"]),
        case("offloaded experts of a dense model", &train(&["--offload-experts", "--dense"]), 1, &["--offload-experts", "--dense", "without experts"]),
        case("offloaded experts spread over devices", &train(&["--offload-experts", "--devices", "flex,ndarray", "--parallel", "experts"]), 1, &["--offload-experts", "--parallel experts", "--parallel data"]),
        case("negative z-loss weight", &train(&["--z-loss-weight=-0.5"]), 1, &["model.moe.losses.z_loss_weight", "--z-loss-weight", "-0.5"]),
        case("min-freq zero", &train(&["--min-freq", "0"]), 1, &["data.min_freq"]),
        case("min-freq leaves only unk", &train(&["--min-freq", "100000"]), 1, &["min_freq", "<unk>", "--min-freq"]),
        case("eval every zero", &train(&["--eval-every", "0"]), 1, &["run.eval_every"]),
        case("checkpoint every zero", &train(&["--checkpoint-every", "0"]), 1, &["run.checkpoint_every"]),
        case("keep zero", &train(&["--keep", "0"]), 1, &["run.keep_checkpoints"]),
        case("too many samples", &train(&["--samples", "5000"]), 1, &["run.samples", "5000"]),
        case("preset warm-up longer than the run", &train(&["--steps", "1"]), 0, &["warm-up of 2 steps", "cut to 0", "--warmup"]),
        case("warm-up flag longer than the run", &train(&["--steps", "4", "--warmup", "9"]), 1, &["--warmup", "9", "--steps"]),
        case("a million experts", &train(&["--experts", "1000000"]), 1, &["not enough memory", "parameters", "available"]),
        case("a million sequences", &train(&["--batch-size", "1000000"]), 1, &["not enough memory", "activations", "--batch-size"]),
        // The parser's own refusals.
        case("steps not a number", &train(&["--steps", "many"]), 2, &["--steps", "many"]),
        case("unknown backend", &["train", "--backend", "cuda"], 2, &["cuda"]),
        case("unknown precision", &train(&["--precision", "f64"]), 2, &["f64"]),
        case("unknown flag", &train(&["--learning-rate", "1"]), 2, &["--learning-rate"]),
        case("corpus beside text", &train(&["--corpus", "tang"]), 2, &["--corpus", "--text"]),
        case("field beside text", &train(&["--field", "body"]), 2, &["--field"]),
        case("resume and overwrite", &["train", "--resume", "--overwrite", "--out", "{dir}/run"], 2, &["--resume", "--overwrite"]),
        case("jsonl without field", &["train", "--jsonl", "{fix}/ok.jsonl", "--out", "{dir}/run"], 2, &["--field"]),
        case("generate without checkpoint", &["generate", "--prompt", "春"], 2, &["--checkpoint"]),
        // Flags that would have no effect.
        case("task beside text", &train(&["--task", "caption"]), 1, &["--text", "caption"]),
        case("preset on resume", &["train", "--resume", "--preset", "small", "--out", "{dir}/run"], 1, &["--preset small", "no effect"]).prepared(copy_run),
        case("seed on resume", &["train", "--resume", "--seed", "7", "--steps", "6", "--backend", "flex", "--out", "{dir}/run"], 0, &["--seed", "no effect", "--resume"]).prepared(copy_run),
        case("parallel on one device", &train(&["--parallel", "experts"]), 0, &["--parallel", "no effect", "--devices"]),
        case("token without a server", &train(&["--token", "secret"]), 0, &["--token", "no effect", "ws://"]),
        case("architecture flags beside a Hugging Face model", &train(&["--init-hf", QWEN2_MOE, "--experts", "8"]), 0, &["--experts", "no effect", "--init-hf"]),
        case("tokenizer flags beside a Hugging Face model", &train(&["--init-hf", QWEN2_MOE, "--min-freq", "3"]), 0, &["--min-freq", "no effect", "tokenizer.json"]),
        case("form samples zero", &["eval", "--checkpoint", "{fix}/run", "--backend", "flex", "--form", "--form-samples", "0"], 1, &["--form-samples", "got 0"]),
        case("config on resume", &["train", "--resume", "--config", "{fix}/tiny.toml", "--out", "{dir}/run"], 1, &["--config", "--resume"]).prepared(copy_run),
        case("model change on resume", &["train", "--resume", "--experts", "8", "--steps", "8", "--backend", "flex", "--out", "{dir}/run"], 1, &["`model`", "--resume"]).prepared(copy_run),
        case("steps below the resumed step", &["train", "--resume", "--steps", "2", "--backend", "flex", "--out", "{dir}/run"], 1, &["already at step 4", "--steps"]).prepared(copy_run),
        case("steps equal to the resumed step", &["train", "--resume", "--steps", "4", "--backend", "flex", "--out", "{dir}/run"], 1, &["already at step 4"]).prepared(copy_run),
        // Run folders.
        case("train into an existing run", &train(&[]), 1, &["already holds a run", "--resume", "--overwrite"]).prepared(copy_run),
        case("train into a folder of the user's files", &train(&[]), 1, &["not a burn-moe run", "`config.json`", "`loss.png`", "--out"]).prepared(users_files),
        case("overwrite a folder of the user's files", &train(&["--overwrite"]), 1, &["not a burn-moe run", "`metrics.jsonl`"]).prepared(users_files),
        case("train into a model folder", &train(&[]), 1, &["not a burn-moe run", "`model.safetensors`"]).prepared(|dir, _| {
            std::fs::create_dir_all(dir.join("run")).unwrap();
            for name in ["config.json", "model.safetensors", "tokenizer.json"] {
                std::fs::write(dir.join("run").join(name), "{}").unwrap();
            }
        }),
        case("train into the corpus's folder", &["train", "--text", "{fix}/corpus.txt", "--config", "{fix}/tiny.toml", "--backend", "flex", "--out", "{fix}"], 1, &["not a burn-moe run", "`corpus.txt`"]),
        case("train into a run's checkpoints", &["train", "--text", "{fix}/corpus.txt", "--config", "{fix}/tiny.toml", "--backend", "flex", "--out", "{dir}/run/checkpoints"], 1, &["inside the run folder", "--out"]).prepared(copy_run),
        case("cache dir is a file", &["train", "--cache-dir", "{fix}/corpus.txt", "--backend", "flex", "--out", "{dir}/run"], 1, &["--cache-dir", "corpus.txt", "is a file"]),
        case("JSON config named .cfg", &["train", "--text", "{fix}/corpus.txt", "--config", "{dir}/run.cfg", "--backend", "flex", "--out", "{dir}/run"], 1, &["model.experts", "got 0"]).prepared(|dir, _| std::fs::write(dir.join("run.cfg"), "{\"model\": {\"experts\": 0}}").unwrap()),
        config_case("weight decay nan", |dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("warmup_steps = 2", "warmup_steps = 2\nweight_decay = nan")).unwrap(), &["optim.weight_decay", "NaN", "finite"]),
        case("a loss that explodes", &train(&["--lr", "30", "--grad-clip", "0", "--steps", "40"]), 3, &["diverged", "the loss exploded", "since step", "saved before the trouble began"]),
        case("out is a file", &["train", "--text", "{fix}/corpus.txt", "--out", "{fix}/corpus.txt"], 1, &["corpus.txt", "is a file"]),
        case("resume into a checkpoint folder", &["train", "--resume", "--steps", "8", "--out", "{dir}/run/checkpoints/step-00000004"], 1, &["checkpoint folder", "--out"]).prepared(copy_run),
        case("resume an empty folder", &["train", "--resume", "--steps", "8", "--out", "{dir}"], 1, &["no checkpoint"]),
        case("resume a locked run", &["train", "--resume", "--steps", "8", "--backend", "flex", "--out", "{dir}/run"], 1, &["another burn-moe process", "pid 4242"]).prepared(lock_run),
        // Corpora.
        case("missing corpus", &["train", "--text", "{dir}/missing.txt", "--out", "{dir}/run"], 1, &["missing.txt", "No such file"]),
        case("empty corpus", &["train", "--text", "{dir}/empty.txt", "--backend", "flex", "--out", "{dir}/run"], 1, &["empty.txt", "empty"]).prepared(|dir, _| std::fs::write(dir.join("empty.txt"), "\n\n").unwrap()),
        case("corpus too short", &["train", "--text", "{dir}/short.txt", "--backend", "flex", "--out", "{dir}/run"], 1, &["short.txt", "too short"]).prepared(|dir, _| std::fs::write(dir.join("short.txt"), "春风\n\n明月\n").unwrap()),
        case("one long document", &["train", "--text", "{dir}/one.txt", "--backend", "flex", "--out", "{dir}/run"], 1, &["one.txt", "1 document", "blank line"]).prepared(|dir, _| std::fs::write(dir.join("one.txt"), "春山月水风花雨云夜江".repeat(2000)).unwrap()),
        case("corpus not UTF-8", &["train", "--text", "{dir}/latin1.txt", "--backend", "flex", "--out", "{dir}/run"], 1, &["latin1.txt", "UTF-8"]).prepared(|dir, _| std::fs::write(dir.join("latin1.txt"), b"caf\xe9\n\nna\xefve\n").unwrap()),
        case("JSON lines cut short", &["train", "--jsonl", "{dir}/cut.jsonl", "--field", "text", "--backend", "flex", "--out", "{dir}/run"], 1, &["cut.jsonl:2", "JSON"]).prepared(|dir, _| std::fs::write(dir.join("cut.jsonl"), "{\"text\": \"春山\"}\n{\"text\": \n").unwrap()),
        case("JSON lines without the field", &["train", "--jsonl", "{fix}/ok.jsonl", "--field", "body", "--backend", "flex", "--out", "{dir}/run"], 1, &["ok.jsonl:1", "body"]),
        // Config files.
        config_case("config typo", |dir, _| write_config(dir, "[data]\nmin_frq = 3\n"), &["bad.toml", "min_frq"]),
        config_case("config wrong type", |dir, _| write_config(dir, "[data]\nmin_freq = \"often\"\n"), &["bad.toml", "often"]),
        config_case("config broken TOML", |dir, _| std::fs::write(dir.join("bad.toml"), "[run\nsteps = 3\n").unwrap(), &["bad.toml"]),
        config_case("moe_every above the layers", |dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("moe_every = 2", "moe_every = 3")).unwrap(), &["model.moe_every", "3", "no MoE layer"]),
        config_case("moe_every zero", |dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("moe_every = 2", "moe_every = 0")).unwrap(), &["model.moe_every", "--dense"]),
        config_case("min_lr above lr", |dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("warmup_steps = 2", "warmup_steps = 2\nlr = 0.001\nmin_lr = 0.01")).unwrap(), &["optim.min_lr", "0.01"]),
        case("config warm-up above steps", &["train", "--text", "{fix}/corpus.txt", "--config", "{dir}/bad.toml", "--backend", "flex", "--out", "{dir}/run"], 0, &["warm-up of 50 steps", "cut to 0"]).prepared(|dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("warmup_steps = 2", "warmup_steps = 50")).unwrap()),
        config_case("dropout of 1.5", |dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("num_layers = 2", "num_layers = 2\ndropout = 1.5")).unwrap(), &["model.dropout", "1.5"]),
        config_case("validation share 0.7", |dir, _| write_config(dir, "[data]\nval_fraction = 0.7\n"), &["data.val_fraction", "0.7"]),
        config_case("validation share 0", |dir, _| write_config(dir, "[data]\nval_fraction = 0.0\n"), &["data.val_fraction"]),
        config_case("capacity factor 0", |dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("capacity.dropless = false", "capacity.dropless = false\ncapacity.train_factor = 0.0")).unwrap(), &["model.moe.capacity.train_factor"]),
        config_case("weight decay 5", |dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("warmup_steps = 2", "warmup_steps = 2\nweight_decay = 5.0")).unwrap(), &["optim.weight_decay"]),
        config_case("heads that do not divide", |dir, _| std::fs::write(dir.join("bad.toml"), TINY_TOML.replace("num_heads = 2", "num_heads = 3")).unwrap(), &["num_heads"]),
        config_case("one image level", |dir, _| write_config(dir, "[data]\nimage_levels = 1\n"), &["data.image_levels"]),
        config_case("unknown section", |dir, _| write_config(dir, "[trainer]\nsteps = 3\n"), &["bad.toml", "trainer"]),
        case("missing config file", &["train", "--config", "{dir}/none.toml", "--out", "{dir}/run"], 1, &["none.toml", "No such file"]),
        // Checkpoint folders.
        case("eval of nothing", &eval("{dir}"), 1, &["no checkpoint here"]),
        case("eval without state.json", &eval("{dir}/run"), 1, &["state.json is missing", "Intact checkpoints", "step-00000002"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            std::fs::remove_file(newest(dir).join("state.json")).unwrap();
        }),
        case("eval of a checkpoint far above its run's history", &eval("{dir}/run"), 0, &["warning", "lowest its run logged", "0.0100 at step 2", "blow-up"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            let metrics = dir.join("run/metrics.jsonl");
            let mut text = std::fs::read_to_string(&metrics).unwrap();
            text.push_str("{\"kind\":\"eval\",\"step\":2,\"val_loss\":0.01,\"val_perplexity\":1.01}\n");
            std::fs::write(&metrics, text).unwrap();
        }),
        config_case("explosion ratio of 1", |dir, _| write_config(dir, "[run.explosion]\nratio = 1.0"), &["run.explosion.ratio", "above 1"]),
        config_case("explosion nats negative", |dir, _| write_config(dir, "[run.explosion]\nnats = -1.0"), &["run.explosion.nats", "-1"]),
        config_case("explosion after zero steps", |dir, _| write_config(dir, "[run.explosion]\nlogged_steps = 0"), &["run.explosion.logged_steps", "got 0"]),
        config_case("explosion field unknown", |dir, _| write_config(dir, "[run.explosion]\npatience = 3"), &["patience"]),
        case("eval with an empty latest", &eval("{dir}/run"), 1, &["`latest` is empty", "Intact checkpoints", "step-00000004"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            std::fs::write(dir.join("run/latest"), "").unwrap();
        }),
        case("resume without latest", &["train", "--resume", "--steps", "8", "--backend", "flex", "--out", "{dir}/run"], 1, &["`latest` file is missing", "step-00000004", "step-00000002"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            std::fs::remove_file(dir.join("run/latest")).unwrap();
        }),
        case("eval with latest naming nothing", &eval("{dir}/run"), 1, &["not there", "step-00000004"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            std::fs::write(dir.join("run/latest"), "checkpoints/step-00000099\n").unwrap();
        }),
        case("eval of a damaged model", &eval("{dir}/run"), 1, &["model.bpk", "changed or damaged", "step-00000002"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            flip_a_byte(&newest(dir).join("model.bpk"));
        }),
        case("eval of a truncated optimizer", &eval("{dir}/run"), 1, &["optimizer.bpk", "changed or damaged"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            let path = newest(dir).join("optimizer.bpk");
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        }),
        case("eval with a swapped tokenizer", &eval("{dir}/run"), 1, &["tokenizer.json", "changed or damaged"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            std::fs::write(newest(dir).join("tokenizer.json"), "{\"kind\": \"char\", \"tokens\": [\"<pad>\", \"<unk>\", \"<bos>\", \"<eos>\", \"a\"]}").unwrap();
        }),
        case("eval with a swapped config", &eval("{dir}/run"), 1, &["config.json", "changed or damaged"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            let path = newest(dir).join("config.json");
            let text = std::fs::read_to_string(&path).unwrap().replace("\"num_experts\": 4", "\"num_experts\": 8");
            std::fs::write(&path, text).unwrap();
        }),
        case("eval with a broken manifest", &eval("{dir}/run"), 1, &["manifest.json", "broken"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            std::fs::write(newest(dir).join("manifest.json"), "{\"files\": ").unwrap();
        }),
        // A checkpoint proves itself without its manifest.
        case("eval of a damaged model without a manifest", &eval("{dir}/run"), 1, &["model.bpk", "changed or damaged", "state.json says"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            std::fs::remove_file(newest(dir).join("manifest.json")).unwrap();
            flip_a_byte(&newest(dir).join("model.bpk"));
        }),
        case("eval of a swapped model without a manifest", &eval("{dir}/run"), 1, &["model.bpk", "changed or damaged", "step-00000002"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            let folder = newest(dir);
            std::fs::remove_file(folder.join("manifest.json")).unwrap();
            std::fs::copy(dir.join("run/checkpoints/step-00000002/model.bpk"), folder.join("model.bpk")).unwrap();
        }),
        case("eval of a checkpoint with its manifest and state record edited", &eval("{dir}/run"), 1, &["state.json", "changed or damaged"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            // The state's record edited to vouch for a swapped model: the manifest catches it.
            let folder = newest(dir);
            std::fs::copy(dir.join("run/checkpoints/step-00000002/model.bpk"), folder.join("model.bpk")).unwrap();
            let older = std::fs::read_to_string(dir.join("run/checkpoints/step-00000002/state.json")).unwrap();
            let older: serde_json::Value = serde_json::from_str(&older).unwrap();
            let path = folder.join("state.json");
            let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            state["files"]["model.bpk"] = older["files"]["model.bpk"].clone();
            std::fs::write(&path, serde_json::to_string(&state).unwrap()).unwrap();
        }),
        case("eval of a checkpoint without checksums", &eval("{dir}/run"), 1, &["cannot be verified", "--no-verify", "step-00000002"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            without_checksums(dir);
        }),
        case("eval --no-verify of a checkpoint without checksums", &["eval", "--checkpoint", "{dir}/run", "--no-verify", "--backend", "flex"], 0, &["--no-verify", "not checked"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            without_checksums(dir);
        }),
        case("generate from a checkpoint without checksums", &["generate", "--checkpoint", "{dir}/run", "--max-tokens", "4", "--backend", "flex"], 1, &["cannot be verified", "--no-verify"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            without_checksums(dir);
        }),
        case("resume from a checkpoint without checksums", &["train", "--resume", "--steps", "6", "--backend", "flex", "--out", "{dir}/run"], 1, &["cannot be verified", "--no-verify"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            without_checksums(dir);
        }),
        case("resume --no-verify from a checkpoint without checksums", &["train", "--resume", "--no-verify", "--steps", "6", "--backend", "flex", "--out", "{dir}/run"], 0, &["--no-verify", "not checked"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            without_checksums(dir);
        }),
        case("no-verify on a new run", &train(&["--no-verify"]), 2, &["--no-verify", "--resume"]),
        case("export of a checkpoint without checksums", &["export", "--checkpoint", "{dir}/run", "--out", "{dir}/hf", "--backend", "flex"], 1, &["cannot be verified", "--no-verify"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            without_checksums(dir);
        }),
        case("a checkpoint save that fails", &["train", "--resume", "--steps", "8", "--backend", "flex", "--out", "{dir}/run"], 1, &["could not save the checkpoint of step 6", "step-00000006", "`latest` still names", "step-00000004", "--resume"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            // A file where the step-6 checkpoint's folder goes.
            std::fs::write(dir.join("run/checkpoints/step-00000006"), "mine").unwrap();
        }),
        // Export.
        case("export into a folder with files", &["export", "--checkpoint", "{fix}/run", "--out", "{dir}/hf", "--backend", "flex"], 1, &["hf", "not empty", "overwritten"]).prepared(|dir, _| {
            std::fs::create_dir_all(dir.join("hf")).unwrap();
            std::fs::write(dir.join("hf/config.json"), "mine").unwrap();
        }),
        case("PEFT adapters of a run that trained every weight", &["export", "--checkpoint", "{fix}/run", "--out", "{dir}/peft", "--backend", "flex", "--adapters"], 1, &["--adapters", "LoRA run", "without `--adapters`"]),
        case("export of a folder with no checkpoint", &["export", "--checkpoint", "{dir}", "--out", "{dir}/hf", "--backend", "flex"], 1, &["no checkpoint here"]),
        case("export in a layout the model does not fit", &["export", "--checkpoint", "{fix}/run", "--out", "{dir}/hf", "--arch", "mixtral", "--backend", "flex"], 1, &["Mixtral"]),
        case("export onto a file", &["export", "--checkpoint", "{fix}/run", "--out", "{dir}/model.safetensors", "--backend", "flex"], 1, &["model.safetensors", "is a file", "--out"]).prepared(|dir, _| {
            std::fs::write(dir.join("model.safetensors"), "mine").unwrap();
        }),
        case("export without --out", &["export", "--checkpoint", "{fix}/run"], 2, &["--out"]),
        case("no-verify with a Hugging Face model", &["generate", "--hf", QWEN2_MOE, "--no-verify", "--max-tokens", "2"], 2, &["--no-verify", "--hf"]),
        case("no-verify in eval with a Hugging Face model", &["eval", "--hf", QWEN2_MOE, "--text", "{fix}/corpus.txt", "--no-verify"], 2, &["--no-verify", "--hf"]),
        case("bf16 weights on a backend without bf16", &["generate", "--hf", QWEN2_MOE, "--weights", "bf16", "--backend", "ndarray", "--max-tokens", "2"], 1, &["cannot hold weights in bf16", "f32", "flex"]),
        case("eval in bf16 on a backend without bf16", &["eval", "--checkpoint", "{fix}/run", "--weights", "bf16", "--backend", "ndarray", "--batches", "1"], 1, &["cannot hold weights in bf16", "f32", "flex"]),
        case("generate in bf16 on a backend without bf16", &["generate", "--checkpoint", "{fix}/run", "--weights", "bf16", "--backend", "ndarray", "--max-tokens", "2"], 1, &["cannot hold weights in bf16", "f32", "flex"]),
        case("an unknown weight format", &["generate", "--hf", QWEN2_MOE, "--weights", "q3"], 2, &["--weights", "q3"]),
        case("export in an unknown layout", &["export", "--checkpoint", "{fix}/run", "--out", "{dir}/hf", "--arch", "llama"], 2, &["--arch", "llama"]),
        case("eval without the model file", &eval("{dir}/run"), 1, &["model.bpk", "missing"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            std::fs::remove_file(newest(dir).join("model.bpk")).unwrap();
        }),
        case("eval of a checkpoint of an old layout", &["eval", "--checkpoint", "{dir}/run", "--no-verify", "--backend", "flex"], 1, &["model.bpk", "does not fit"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            // With no checksums to check, the model must still not load.
            let folder = without_checksums(dir);
            let path = folder.join("config.json");
            let text = std::fs::read_to_string(&path).unwrap().replace("\"d_hidden\": 32", "\"d_hidden\": 48");
            std::fs::write(&path, text).unwrap();
        }),
        case("eval with zero batches", &["eval", "--checkpoint", "{fix}/run", "--batches", "0", "--backend", "flex"], 1, &["--batches", "got 0"]),
        case("eval after the corpus changed", &eval("{dir}/run"), 1, &["corpus changed", "corpus.txt"]).prepared(changed_corpus_run),
        case("resume after the corpus changed", &["train", "--resume", "--steps", "8", "--backend", "flex", "--out", "{dir}/run"], 1, &["corpus changed", "corpus.txt"]).prepared(changed_corpus_run),
        case("resume after the corpus was deleted", &["train", "--resume", "--steps", "8", "--backend", "flex", "--out", "{dir}/run"], 1, &["corpus.txt", "is not there", "--text"]).prepared(|dir, fix| {
            changed_corpus_run(dir, fix);
            std::fs::remove_file(dir.join("corpus.txt")).unwrap();
        }),
        case("resume from a moved corpus", &["train", "--resume", "--steps", "6", "--text", "{dir}/moved/corpus.txt", "--backend", "flex", "--out", "{dir}/run"], 0, &[]).prepared(moved_corpus_run),
        case("resume from a moved corpus that changed", &["train", "--resume", "--steps", "6", "--text", "{dir}/moved/corpus.txt", "--backend", "flex", "--out", "{dir}/run"], 1, &["corpus changed"]).prepared(|dir, fix| {
            moved_corpus_run(dir, fix);
            std::fs::write(dir.join("moved/corpus.txt"), "春山月水风花雨云夜江\n\n".repeat(300)).unwrap();
        }),
        case("min-freq on resume", &["train", "--resume", "--steps", "6", "--min-freq", "3", "--backend", "flex", "--out", "{dir}/run"], 0, &["--min-freq", "no effect"]).prepared(copy_run),
        // Prompts and sampling.
        case("temperature NaN", &generate(&["--temperature", "NaN"]), 1, &["--temperature", "NaN"]),
        case("temperature infinite", &generate(&["--temperature", "inf"]), 1, &["--temperature", "inf"]),
        case("temperature negative", &generate(&["--temperature=-0.5"]), 1, &["--temperature", "-0.5"]),
        case("top-p zero", &generate(&["--top-p", "0"]), 1, &["--top-p", "got 0"]),
        case("top-p above one", &generate(&["--top-p", "1.5"]), 1, &["--top-p", "1.5"]),
        case("no tokens to generate", &generate(&["--max-tokens", "0"]), 1, &["--max-tokens"]),
        case("generate from a damaged run", &["generate", "--checkpoint", "{dir}/run", "--backend", "flex"], 1, &["model.bpk", "changed or damaged"]).prepared(|dir, fix| {
            copy_run(dir, fix);
            flip_a_byte(&newest(dir).join("model.bpk"));
        }),
        case("compare with --dense", &["compare", "--dense", "--out", "{dir}/cmp"], 1, &["compare", "--dense"]),
        case("compare with --resume", &["compare", "--resume", "--out", "{dir}/cmp"], 1, &["compare", "--resume"]),
        case("compare with a Hugging Face model", &["compare", "--init-hf", QWEN2_MOE, "--text", "{fix}/corpus.txt", "--backend", "flex", "--out", "{dir}/cmp"], 1, &["compare", "--init-hf", "no dense twin"]),
        case("compare whose dense side ran", &["compare", "--text", "{fix}/corpus.txt", "--config", "{fix}/tiny.toml", "--backend", "flex", "--out", "{dir}/cmp"], 1, &["dense", "already holds a run", "--overwrite"]).prepared(|dir, fix| copy_dir(&fix.join("run"), &dir.join("cmp/dense"))),
        case("compare into a compare that exists", &["compare", "--text", "{fix}/corpus.txt", "--config", "{fix}/tiny.toml", "--backend", "flex", "--out", "{dir}/cmp"], 1, &["moe", "already holds a run", "--overwrite"]).prepared(|dir, fix| copy_dir(&fix.join("run"), &dir.join("cmp/moe"))),
        // Divergence.
        case("diverging from the first step", &train(&["--lr", "1e6", "--grad-clip", "0", "--steps", "40", "--checkpoint-every", "40"]), 3, &["diverged at step", "NaN", "No checkpoint was written"]),
    ]
}

/// A run trained on a corpus in the case's folder, which is then edited.
fn changed_corpus_run(dir: &Path, fix: &Path) {
    let corpus = corpus_run(dir, fix);
    let mut text = std::fs::read_to_string(&corpus).unwrap();
    text.push_str("\n\n新添的一首诗，\n");
    std::fs::write(&corpus, text).unwrap();
}

/// A run trained on a corpus in the case's folder, which then moves to `moved/corpus.txt`.
fn moved_corpus_run(dir: &Path, fix: &Path) {
    let corpus = corpus_run(dir, fix);
    std::fs::create_dir_all(dir.join("moved")).unwrap();
    std::fs::rename(&corpus, dir.join("moved/corpus.txt")).unwrap();
}

/// A run `{dir}/run` trained on a copy of the fixture's corpus in `{dir}`; the copy's path.
fn corpus_run(dir: &Path, fix: &Path) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    std::fs::copy(fix.join("corpus.txt"), &corpus).unwrap();
    let status = Command::new(PROGRAM)
        .args(["train", "--text"])
        .arg(&corpus)
        .args(["--config"])
        .arg(fix.join("tiny.toml"))
        .args(["--backend", "flex", "--out"])
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    corpus
}

/// A copy of the run whose lock another process (here: this test, as pid 4242) holds.
fn lock_run(dir: &Path, fix: &Path) {
    copy_run(dir, fix);
    let path = dir.join("run/.lock");
    std::fs::write(&path, "4242").unwrap();
    let file = std::fs::OpenOptions::new().read(true).open(&path).unwrap();
    file.lock().unwrap();
    // Held until the test process ends.
    std::mem::forget(file);
}

/// The shared fixture: the corpus, the tiny shape, a JSON-lines file and a trained run.
fn fixture(root: &Path) -> PathBuf {
    let fix = root.join("fixture");
    std::fs::create_dir_all(&fix).unwrap();
    write_generated_corpus(&fix.join("corpus.txt"));
    std::fs::write(fix.join("tiny.toml"), TINY_TOML).unwrap();
    std::fs::write(fix.join("ok.jsonl"), "{\"text\": \"春山月水\"}\n").unwrap();
    let output = Command::new(PROGRAM)
        .args(["train", "--text"])
        .arg(fix.join("corpus.txt"))
        .arg("--config")
        .arg(fix.join("tiny.toml"))
        .args(["--backend", "flex", "--out"])
        .arg(fix.join("run"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the fixture run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    fix
}

#[test]
fn every_bad_input_is_refused_by_name() {
    let root = common::temp_dir("bad-inputs");
    let fix = fixture(&root);
    let cases = cases();
    assert!(cases.len() >= 150, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let dir = root.join(format!("case-{index:02}"));
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(prepare) = case.prepare {
            prepare(&dir, &fix);
        }
        let args: Vec<String> = case
            .args
            .iter()
            .map(|arg| {
                arg.replace("{dir}", &dir.display().to_string())
                    .replace("{fix}", &fix.display().to_string())
            })
            .collect();
        let output = Command::new(PROGRAM)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code().unwrap_or(-1);
        let missing: Vec<&&str> = case
            .expect
            .iter()
            .filter(|fragment| !stderr.contains(**fragment))
            .collect();
        if code != case.code || !missing.is_empty() || stderr.contains("panicked") {
            failures.push(format!(
                "{}: exit {code} (want {}), missing {missing:?}\n  args: {}\n  stderr: {}",
                case.name,
                case.code,
                args.join(" "),
                stderr.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Without a desktop session (no `XDG_RUNTIME_DIR`), probing for a GPU must not print the
/// Vulkan drivers' complaints about it.
#[test]
fn no_display_noise_without_a_desktop_session() {
    let root = common::temp_dir("bad-inputs-quiet");
    let fix = fixture(&root);
    let output = Command::new(PROGRAM)
        .args(["eval", "--checkpoint"])
        .arg(fix.join("run"))
        .args(["--backend", "auto"])
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
}

/// `generate` names the prompt's characters the vocabulary lacks, and never samples `<unk>`
/// (which prints as `?`): at temperature 100 with no top-k or top-p cut, the fixture's
/// 16-token vocabulary gives `<unk>` about one draw in 16, so ten generations that never
/// show it would be a chance of about 1 in 25,000 without the ban.
#[test]
fn generation_names_unknown_prompt_characters_and_never_samples_unk() {
    let root = common::temp_dir("unknown-characters");
    let fix = fixture(&root);
    assert!(!std::fs::read_to_string(fix.join("corpus.txt"))
        .unwrap()
        .contains('?'));
    for seed in 0..10 {
        let output = Command::new(PROGRAM)
            .args(["generate", "--checkpoint"])
            .arg(fix.join("run"))
            .args([
                "--backend",
                "flex",
                "--prompt",
                "春😀",
                "--temperature",
                "100",
            ])
            .args([
                "--top-k",
                "0",
                "--top-p",
                "1",
                "--max-tokens",
                "200",
                "--seed",
            ])
            .arg(seed.to_string())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.contains("not in the model's vocabulary") && stderr.contains('😀'),
            "{stderr}"
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let generated = stdout.split_once("春😀").map_or(&*stdout, |(_, rest)| rest);
        assert!(!generated.contains('?'), "seed {seed}: {stdout}");
    }
}

/// Under an address-space limit (`ulimit -v`) the memory check refuses a batch that cannot
/// fit, naming the limit, instead of the allocator aborting mid-step.
#[cfg(target_os = "linux")]
#[test]
fn the_memory_check_honours_the_address_space_limit() {
    let root = common::temp_dir("address-space");
    let corpus = root.join("corpus.txt");
    write_generated_corpus(&corpus);
    let script = format!(
        "ulimit -v 3000000 && exec '{PROGRAM}' train --text '{}' --context 16 --batch-size 8192 --backend flex --out '{}'",
        corpus.display(),
        root.join("run").display()
    );
    let output = Command::new("sh").args(["-c", &script]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not enough memory") && stderr.contains("address-space limit"),
        "{stderr}"
    );
}
