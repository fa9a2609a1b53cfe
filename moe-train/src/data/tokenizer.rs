//! Tokenizers: one token per character (classical Chinese), or byte-level BPE trained locally
//! with the `tokenizers` crate. Both reserve ids 0-3 for `<pad> <unk> <bos> <eos>` and are
//! saved as one JSON file beside each checkpoint.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::error::{io, Result, TrainError};

/// Padding.
pub const PAD: usize = 0;
/// Unknown character.
pub const UNK: usize = 1;
/// Start of a document.
pub const BOS: usize = 2;
/// End of a document.
pub const EOS: usize = 3;
/// The special tokens, by id.
pub const SPECIALS: [&str; 4] = ["<pad>", "<unk>", "<bos>", "<eos>"];

/// A character-level vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharTokenizer {
    tokens: Vec<String>,
    ids: HashMap<char, usize>,
}

impl CharTokenizer {
    /// The characters of `documents` seen at least `min_freq` times, most frequent first
    /// (ties in character order, so the vocabulary does not depend on hashing).
    pub fn build<'a>(documents: impl Iterator<Item = &'a str>, min_freq: usize) -> Self {
        let mut counts: HashMap<char, usize> = HashMap::new();
        for text in documents {
            for c in text.chars() {
                *counts.entry(c).or_default() += 1;
            }
        }
        let mut kept: Vec<(char, usize)> = counts
            .into_iter()
            .filter(|&(_, n)| n >= min_freq.max(1))
            .collect();
        kept.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Self::from_tokens(
            SPECIALS
                .iter()
                .map(|s| s.to_string())
                .chain(kept.into_iter().map(|(c, _)| c.to_string()))
                .collect(),
        )
    }

    fn from_tokens(tokens: Vec<String>) -> Self {
        let ids = tokens
            .iter()
            .enumerate()
            .skip(SPECIALS.len())
            .filter_map(|(id, token)| token.chars().next().map(|c| (c, id)))
            .collect();
        Self { tokens, ids }
    }
}

/// A tokenizer of one of three kinds.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// One token per character.
    Char(CharTokenizer),
    /// Byte-level BPE trained here (ids 0-3 are the specials).
    Bpe(Box<HfTokenizer>),
    /// The tokenizer of a Hugging Face model folder (`train --init-hf`), with its own
    /// special ids.
    Hf(Box<HfText>),
}

/// A Hugging Face folder's `tokenizer.json` and the special ids its `config.json` names.
#[derive(Debug, Clone)]
pub struct HfText {
    /// The tokenizer.
    pub inner: HfTokenizer,
    /// Its special tokens.
    pub specials: Specials,
}

/// The ids a tokenizer marks documents and padding with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Specials {
    /// Start of a document.
    pub bos: usize,
    /// End of a document.
    pub eos: usize,
    /// Padding, whose targets do not count; `None` when the tokenizer has none.
    pub pad: Option<usize>,
}

impl Specials {
    /// burn-moe's own: `<bos>` 2, `<eos>` 3, `<pad>` 0.
    pub const OURS: Specials = Specials {
        bos: BOS,
        eos: EOS,
        pad: Some(PAD),
    };

    /// Tokens generation must not produce: padding and the start of a document.
    pub fn banned(&self) -> Vec<usize> {
        self.pad
            .into_iter()
            .chain([self.bos])
            .filter(|&id| id != self.eos)
            .collect()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Saved {
    Char {
        tokens: Vec<String>,
    },
    Bpe {
        tokenizer: serde_json::Value,
    },
    Hf {
        tokenizer: serde_json::Value,
        specials: Specials,
    },
}

impl Tokenizer {
    /// Trains a byte-level BPE of `vocab_size` tokens on `documents`.
    pub fn train_bpe<'a>(
        documents: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
    ) -> Result<Self> {
        let error = |e: tokenizers::Error| TrainError::Tokenizer(e.to_string());
        let specials: Vec<AddedToken> = SPECIALS
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut tokenizer = HfTokenizer::new(BPE::default());
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        tokenizer.train(&mut trainer, documents).map_err(error)?;
        for (id, special) in SPECIALS.iter().enumerate() {
            if tokenizer.token_to_id(special) != Some(id as u32) {
                return Err(TrainError::Tokenizer(format!(
                    "{special} did not get id {id}"
                )));
            }
        }
        Ok(Self::Bpe(Box::new(tokenizer)))
    }

    /// Reads a Hugging Face folder's `tokenizer.json`; the special ids come from its
    /// `config.json` (`bos_token_id`, else the end of sequence; `eos_token_id`, the first when
    /// it lists several, else the tokenizer's first special token; `pad_token_id` when it
    /// differs from the end of sequence).
    pub fn load_hf(dir: &Path, config: &serde_json::Value) -> Result<Self> {
        let inner = read_tokenizer_json(dir)?;
        let id = |key: &str| config_token_ids(config, key).first().copied();
        // Without `eos_token_id`, the tokenizer's first special token (`<|endoftext|>` of the
        // GPT-2-style tokenizers) ends documents.
        let first_special = || {
            let mut specials: Vec<u32> = inner
                .get_added_tokens_decoder()
                .iter()
                .filter(|(_, token)| token.special)
                .map(|(&id, _)| id)
                .collect();
            specials.sort_unstable();
            specials.first().map(|&id| id as usize)
        };
        let eos = id("eos_token_id").or_else(first_special).ok_or_else(|| {
            TrainError::Tokenizer(format!(
                "{}: no `eos_token_id` and no special token in tokenizer.json; fine-tuning marks the end of each document with one",
                dir.join("config.json").display()
            ))
        })?;
        let specials = Specials {
            bos: id("bos_token_id").unwrap_or(eos),
            eos,
            pad: id("pad_token_id").filter(|&pad| pad != eos),
        };
        Ok(Self::Hf(Box::new(HfText { inner, specials })))
    }

    /// The ids it marks documents and padding with.
    pub fn specials(&self) -> Specials {
        match self {
            Tokenizer::Hf(t) => t.specials,
            _ => Specials::OURS,
        }
    }

    /// Its `tokenizer.json` in the Hugging Face `tokenizers` format (for `export`), which
    /// transformers' `AutoTokenizer` and `generate --hf` read and which encodes as
    /// [`encode_prompt`](Self::encode_prompt) does: a folder's own tokenizer as it came;
    /// burn-moe's character vocabulary as a `WordLevel` model over single characters (a
    /// `Split` pre-tokenizer isolating each one, a `Fuse` decoder joining them back); its
    /// byte-level BPE as it is. burn-moe's two put `<bos>` first through a
    /// `TemplateProcessing` post-processor.
    pub fn hf_json(&self) -> Result<String> {
        let json = match self {
            Tokenizer::Hf(t) => return Ok(tokenizer_json(&t.inner)?.to_string()),
            Tokenizer::Char(t) => char_tokenizer_json(&t.tokens),
            Tokenizer::Bpe(t) => {
                let mut json = tokenizer_json(t)?;
                json["post_processor"] = bos_template();
                json
            }
        };
        Ok(serde_json::to_string_pretty(&json).expect("a tokenizer serialises"))
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.tokens.len(),
            Tokenizer::Bpe(t) => t.get_vocab_size(true),
            Tokenizer::Hf(t) => t.inner.get_vocab_size(true),
        }
    }

    /// Tokens generation must not produce: [`Specials::banned`], and `<unk>` for burn-moe's
    /// own tokenizers (a sampled `<unk>` would print as `?`: it stands for every character the
    /// vocabulary lacks, not for one of them).
    pub fn banned_in_generation(&self) -> Vec<usize> {
        let mut banned = self.specials().banned();
        if !matches!(self, Tokenizer::Hf(_)) {
            banned.push(UNK);
        }
        banned
    }

    /// The characters of `text` that burn-moe's own tokenizers cannot encode (they become
    /// `<unk>`), each once, in order of appearance; empty for a Hugging Face tokenizer.
    pub fn unknown_characters(&self, text: &str) -> Vec<char> {
        let mut unknown: Vec<char> = Vec::new();
        for c in text.chars() {
            let missing = match self {
                Tokenizer::Char(t) => !t.ids.contains_key(&c),
                Tokenizer::Bpe(_) => self.encode(c.encode_utf8(&mut [0; 4])).contains(&UNK),
                Tokenizer::Hf(_) => false,
            };
            if missing && !unknown.contains(&c) {
                unknown.push(c);
            }
        }
        unknown
    }

    /// Token ids of `text` (no `<bos>`/`<eos>`).
    pub fn encode(&self, text: &str) -> Vec<usize> {
        match self {
            Tokenizer::Char(t) => text
                .chars()
                .map(|c| t.ids.get(&c).copied().unwrap_or(UNK))
                .collect(),
            Tokenizer::Bpe(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().iter().map(|&id| id as usize).collect())
                .unwrap_or_default(),
            Tokenizer::Hf(t) => t
                .inner
                .encode(text, false)
                .map(|e| e.get_ids().iter().map(|&id| id as usize).collect())
                .unwrap_or_default(),
        }
    }

    /// `text` as the start of a document, which is how a prompt is read: burn-moe's own
    /// tokenizers put `<bos>` first; a Hugging Face tokenizer encodes it as its
    /// `tokenizer.json` says (its post-processor: Mixtral's adds `<s>`, OLMoE's and
    /// Qwen2-MoE's add nothing), as transformers and `generate --hf` do. So a model fine-tuned
    /// from a folder and the folder itself read a prompt alike.
    pub fn encode_prompt(&self, text: &str) -> Vec<usize> {
        match self {
            Tokenizer::Hf(t) => t
                .inner
                .encode(text, true)
                .map(|e| e.get_ids().iter().map(|&id| id as usize).collect())
                .unwrap_or_default(),
            _ => {
                let mut ids = vec![self.specials().bos];
                ids.extend(self.encode(text));
                ids
            }
        }
    }

    /// A training document: [`encode_prompt`](Self::encode_prompt) of `text`, then the end of
    /// sequence (unless the tokenizer's template already ends with it).
    pub fn encode_document(&self, text: &str) -> Vec<usize> {
        let eos = self.specials().eos;
        let mut ids = self.encode_prompt(text);
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
        ids
    }

    /// Text of `ids`; `<pad>`, `<bos>` and `<eos>` are dropped, `<unk>` shows as `?`.
    pub fn decode(&self, ids: &[usize]) -> String {
        match self {
            Tokenizer::Char(t) => ids
                .iter()
                .filter(|&&id| id != PAD && id != BOS && id != EOS)
                .map(|&id| match id {
                    UNK => "?",
                    _ => t.tokens.get(id).map_or("?", String::as_str),
                })
                .collect(),
            Tokenizer::Bpe(t) => {
                let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
                t.decode(&ids, true).unwrap_or_default()
            }
            Tokenizer::Hf(t) => {
                let ids: Vec<u32> = ids.iter().map(|&id| id as u32).collect();
                t.inner.decode(&ids, true).unwrap_or_default()
            }
        }
    }

    /// Writes the tokenizer as JSON.
    pub fn save(&self, path: &Path) -> Result<()> {
        let saved = match self {
            Tokenizer::Char(t) => Saved::Char {
                tokens: t.tokens.clone(),
            },
            Tokenizer::Bpe(t) => Saved::Bpe {
                tokenizer: tokenizer_json(t)?,
            },
            Tokenizer::Hf(t) => Saved::Hf {
                tokenizer: tokenizer_json(&t.inner)?,
                specials: t.specials,
            },
        };
        let json = serde_json::to_string(&saved).expect("a tokenizer serialises");
        std::fs::write(path, json).map_err(io(path))
    }

    /// Reads a tokenizer written by [`save`](Self::save).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let broken = |reason: String| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: format!("not a burn-moe tokenizer: {reason}"),
        };
        match serde_json::from_str::<Saved>(&text).map_err(|e| broken(e.to_string()))? {
            Saved::Char { tokens } => {
                if tokens.len() < SPECIALS.len()
                    || tokens[..SPECIALS.len()] != SPECIALS.map(String::from)
                {
                    return Err(broken(
                        "the first four tokens are not <pad> <unk> <bos> <eos>".into(),
                    ));
                }
                Ok(Tokenizer::Char(CharTokenizer::from_tokens(tokens)))
            }
            Saved::Bpe { tokenizer } => {
                let tokenizer: HfTokenizer = tokenizer
                    .to_string()
                    .parse()
                    .map_err(|e: tokenizers::Error| broken(e.to_string()))?;
                Ok(Tokenizer::Bpe(Box::new(tokenizer)))
            }
            Saved::Hf {
                tokenizer,
                specials,
            } => {
                let inner: HfTokenizer = tokenizer
                    .to_string()
                    .parse()
                    .map_err(|e: tokenizers::Error| broken(e.to_string()))?;
                Ok(Tokenizer::Hf(Box::new(HfText { inner, specials })))
            }
        }
    }
}

/// The `tokenizer.json` of a character vocabulary (`tokens[id]`, the specials first).
fn char_tokenizer_json(tokens: &[String]) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), id.into()))
        .collect();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, content)| {
            serde_json::json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            })
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Split",
            "pattern": { "Regex": "[\\s\\S]" },
            "behavior": "Isolated",
            "invert": false,
        },
        "post_processor": bos_template(),
        "decoder": { "type": "Fuse" },
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": SPECIALS[UNK] },
    })
}

/// A post-processor that puts `<bos>` before a sequence (and before each of a pair).
fn bos_template() -> serde_json::Value {
    let bos = SPECIALS[BOS];
    let special = serde_json::json!({ "SpecialToken": { "id": bos, "type_id": 0 } });
    let sequence = |id: &str| serde_json::json!({ "Sequence": { "id": id, "type_id": 0 } });
    serde_json::json!({
        "type": "TemplateProcessing",
        "single": [special.clone(), sequence("A")],
        "pair": [special.clone(), sequence("A"), special, sequence("B")],
        "special_tokens": { bos: { "id": bos, "ids": [BOS], "tokens": [bos] } },
    })
}

/// A `tokenizers` tokenizer as JSON.
fn tokenizer_json(tokenizer: &HfTokenizer) -> Result<serde_json::Value> {
    let text = tokenizer
        .to_string(false)
        .map_err(|e| TrainError::Tokenizer(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Tokenizer(e.to_string()))
}

/// A Hugging Face model folder's `tokenizer.json`, read with the `tokenizers` crate.
pub fn read_tokenizer_json(dir: &Path) -> Result<HfTokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(TrainError::Argument(format!(
            "{} has no tokenizer.json; burn-moe reads the tokenizer the model was trained with from its folder",
            dir.display()
        )));
    }
    HfTokenizer::from_file(&path)
        .map_err(|e| TrainError::Tokenizer(format!("{}: {e}", path.display())))
}

/// The token ids a Hugging Face `config.json` gives under `key` (`eos_token_id`, ...): one
/// number or a list; none when it is absent or null.
pub fn config_token_ids(config: &serde_json::Value, key: &str) -> Vec<usize> {
    match config.get(key) {
        Some(serde_json::Value::Number(id)) => {
            id.as_u64().into_iter().map(|id| id as usize).collect()
        }
        Some(serde_json::Value::Array(ids)) => ids
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .map(|id| id as usize)
            .collect(),
        _ => Vec::new(),
    }
}
