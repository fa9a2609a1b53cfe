//! Text printed as it is generated, for `generate` on a checkpoint and on a Hugging Face
//! folder alike.

use std::io::Write;

use moe_models::{GenerationConfig, MoeTransformer};

use crate::error::Result;

/// Generates from `ids` (the tokens of `prompt`), printing `prompt` and then the text as it
/// grows; returns the prompt and the continuation.
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
    model.generate(ids, generation, |token| {
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
    Ok(format!("{prompt}{shown}"))
}
