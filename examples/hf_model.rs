//! A Hugging Face MoE model in a Burn program: load a hub folder (Mixtral, Qwen2-MoE or
//! OLMoE) into burn-moe's modules, continue a prompt greedily with the folder's tokenizer,
//! and write the model back as a Hugging Face folder that transformers loads.
//!
//! ```sh
//! cargo run --release --example hf_model -- --hf tests/fixtures/hf/olmoe --prompt "Experts" \
//!     --save /tmp/olmoe-again
//! bench/.venv/bin/python tests/fixtures/hf/make_fixtures.py --check-export /tmp/olmoe-again olmoe
//! ```

use std::path::PathBuf;

use burn::tensor::Device;
use burn_moe::models::hf;
use burn_moe::models::{GenerationConfig, SamplingConfig};
use burn_moe::train::commands::hf::HfTokenizer;
use clap::Parser;

/// Command line.
#[derive(Parser, Debug)]
struct Args {
    /// The model folder.
    #[arg(long)]
    hf: PathBuf,
    /// Text to continue.
    #[arg(long, default_value = "The")]
    prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Write the model back as a Hugging Face folder here.
    #[arg(long)]
    save: Option<PathBuf>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let device = Device::flex();
    let loaded = hf::load(&args.hf, &device)?;
    let count = loaded.model.config().parameter_count();
    println!(
        "{}: {} parameters, {} active per token",
        loaded.architecture.class_name(),
        count.total,
        count.active
    );

    let tokenizer = HfTokenizer::load(&args.hf, &loaded.config_json)?;
    let prompt = tokenizer.encode(&args.prompt)?;
    let greedy = GenerationConfig {
        max_new_tokens: args.max_tokens,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        },
        stop_tokens: tokenizer.eos.clone(),
        banned_tokens: Vec::new(),
    };
    let continuation = loaded.model.generate(&prompt, &greedy, |_| {})?;
    println!("{}{}", args.prompt, tokenizer.decode(&continuation));

    if let Some(out) = &args.save {
        hf::save(
            &loaded.model,
            loaded.architecture,
            out,
            Some(&loaded.config_json),
        )?;
        std::fs::copy(args.hf.join("tokenizer.json"), out.join("tokenizer.json"))?;
        println!("saved to {}", out.display());
    }
    Ok(())
}
