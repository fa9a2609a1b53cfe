//! Text printed as it is generated, for `generate` on a checkpoint and on a Hugging Face
//! folder alike.

use std::io::Write;

use moe_models::{GenerationConfig, MoeTransformer};

use crate::error::Result;

/// Generates from `ids` (the tokens of `prompt`), printing `prompt` and then the text as it
/// grows, and on stderr the prompt's and the generation's speed; returns the prompt and the
/// continuation.
pub fn stream(
    model: &MoeTransformer,
    prompt: &str,
    ids: &[usize],
    generation: &GenerationConfig,
    decode: impl Fn(&[usize]) -> String,
) -> Result<String> {
    let mut stdout = std::io::stdout();
    let _ = write!(stdout, "{prompt}");
    let mut generated = Vec::new();
    let mut shown = String::new();
    let started = std::time::Instant::now();
    let mut first_token_at = None;
    model.generate(ids, generation, |token| {
        first_token_at.get_or_insert_with(|| started.elapsed().as_secs_f64());
        generated.push(token);
        // Decode everything so far and print what is new (byte-level BPE tokens may complete
        // a character only together).
        let text = decode(&generated);
        if let Some(new) = text.strip_prefix(shown.as_str()) {
            let _ = write!(stdout, "{new}");
            let _ = stdout.flush();
        }
        shown = text;
    })?;
    let _ = writeln!(stdout);
    if let Some(prompt_seconds) = first_token_at {
        let decode_seconds = started.elapsed().as_secs_f64() - prompt_seconds;
        let decoded = generated.len() - 1;
        eprintln!(
            "prompt: {} tokens in {prompt_seconds:.2} s ({:.1} tokens/s); then {decoded} \
             tokens in {decode_seconds:.2} s ({:.2} tokens/s)",
            ids.len(),
            ids.len() as f64 / prompt_seconds.max(1e-9),
            decoded as f64 / decode_seconds.max(1e-9),
        );
    }
    Ok(format!("{prompt}{shown}"))
}
