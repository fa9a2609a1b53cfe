//! Whether generated poems keep their form: the share of generated lines as long as the
//! prompt's line.
//!
//! Regulated Tang verse (律诗, 绝句) keeps one line length throughout a poem: five or seven
//! characters. A model that learned the form continues a five-character first line with
//! five-character lines. [`measure`] prompts the model with first lines of validation poems
//! (five and seven characters), samples a continuation of each, cuts the text into lines at the
//! poem punctuation and counts the complete lines whose length equals the prompt's.

use moe_models::{GenerationConfig, MoeTransformer, SamplingConfig};

use crate::data::tokenizer::Tokenizer;

/// Punctuation that ends a line of verse.
const LINE_ENDS: [char; 6] = ['，', '。', '？', '！', '；', '\n'];

/// Line lengths (in characters) of the complete lines of `text`: those ended by punctuation.
/// The text after the last punctuation (a line the sample did not finish) is left out.
pub fn line_lengths(text: &str) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut current = 0;
    for c in text.chars() {
        if LINE_ENDS.contains(&c) {
            if current > 0 {
                lengths.push(current);
            }
            current = 0;
        } else if !c.is_whitespace() {
            current += 1;
        }
    }
    lengths
}

/// The first line of a poem (without its punctuation) if it has `length` characters.
pub fn first_line_of(text: &str, length: usize) -> Option<String> {
    let line: String = text
        .chars()
        .take_while(|c| !LINE_ENDS.contains(c))
        .filter(|c| !c.is_whitespace())
        .collect();
    (line.chars().count() == length).then_some(line)
}

/// How well samples prompted with lines of one length keep it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FormShare {
    /// The prompts' line length.
    pub length: usize,
    /// Samples generated.
    pub samples: usize,
    /// Complete lines in them (the prompt's own line included, as the model ended it).
    pub lines: usize,
    /// Lines of the prompt's length.
    pub kept: usize,
}

impl FormShare {
    /// `kept / lines` (0 without lines).
    pub fn share(&self) -> f64 {
        if self.lines == 0 {
            0.0
        } else {
            self.kept as f64 / self.lines as f64
        }
    }
}

/// Samples `samples_per_length` continuations of first lines of 5 and of 7 characters taken
/// from `poems` (in order, cycling when there are fewer), at most `max_tokens` each, with the
/// default sampling settings seeded from `seed`; returns one [`FormShare`] per length (none for
/// a length no poem starts with).
pub fn measure(
    model: &MoeTransformer,
    tokenizer: &Tokenizer,
    poems: &[String],
    samples_per_length: usize,
    max_tokens: usize,
    seed: u64,
) -> Vec<FormShare> {
    let mut shares = Vec::new();
    for length in [5, 7] {
        let prompts: Vec<String> = poems
            .iter()
            .filter_map(|poem| first_line_of(poem, length))
            .collect();
        if prompts.is_empty() {
            continue;
        }
        let mut share = FormShare {
            length,
            ..FormShare::default()
        };
        for i in 0..samples_per_length {
            let prompt = &prompts[i % prompts.len()];
            let specials = tokenizer.specials();
            let ids = tokenizer.encode_prompt(prompt);
            let config = GenerationConfig {
                max_new_tokens: max_tokens,
                sampling: SamplingConfig {
                    seed: seed.wrapping_add((length * 100_000 + i) as u64),
                    ..SamplingConfig::default()
                },
                stop_tokens: vec![specials.eos],
                banned_tokens: tokenizer.banned_in_generation(),
            };
            let Ok(generated) = model.generate(&ids, &config, |_| {}) else {
                continue;
            };
            let text = format!("{prompt}{}", tokenizer.decode(&generated));
            let lengths = line_lengths(&text);
            share.samples += 1;
            share.lines += lengths.len();
            share.kept += lengths.iter().filter(|&&l| l == length).count();
        }
        shares.push(share);
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_cut_at_poem_punctuation_and_an_unfinished_one_is_left_out() {
        assert_eq!(
            line_lengths("床前明月光，疑是地上霜。舉頭望明月，低頭思"),
            [5, 5, 5]
        );
        assert_eq!(line_lengths("春眠不覺曉，\n處處聞啼鳥。"), [5, 5]);
        assert_eq!(line_lengths("一二三四五六七。一二三？"), [7, 3]);
        assert_eq!(line_lengths("無標點"), Vec::<usize>::new());
    }

    #[test]
    fn a_first_line_is_a_prompt_only_at_the_length_asked() {
        assert_eq!(
            first_line_of("床前明月光，疑是地上霜。", 5).as_deref(),
            Some("床前明月光")
        );
        assert_eq!(first_line_of("床前明月光，疑是地上霜。", 7), None);
        assert_eq!(
            first_line_of("朝辭白帝彩雲間，千里江陵一日還。", 7).as_deref(),
            Some("朝辭白帝彩雲間")
        );
    }
}
