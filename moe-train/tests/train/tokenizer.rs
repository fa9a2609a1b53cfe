//! Tokenizers round-trip.

use moe_train::data::tokenizer::{CharTokenizer, Tokenizer, BOS, EOS, UNK};

use crate::common::temp_dir;

#[test]
fn the_character_tokenizer_round_trips_and_saves() {
    let docs = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。\n"];
    let tokenizer = Tokenizer::Char(CharTokenizer::build(docs.iter().copied(), 1));
    // 4 specials + the distinct characters.
    let distinct: std::collections::BTreeSet<char> = docs.iter().flat_map(|d| d.chars()).collect();
    assert_eq!(tokenizer.vocab_size(), 4 + distinct.len());
    for doc in docs {
        assert_eq!(tokenizer.decode(&tokenizer.encode(doc)), doc);
    }
    let ids = tokenizer.encode_document("明月");
    assert_eq!((ids[0], *ids.last().unwrap()), (BOS, EOS));
    assert_eq!(tokenizer.decode(&ids), "明月");
    assert_eq!(tokenizer.encode("龍"), vec![UNK]);
    // The most frequent characters come first; 明 月 头 ， 。 appear twice each, and ties go
    // in character order, so 。 (U+3002) gets the first free id.
    assert_eq!(tokenizer.encode("。"), vec![4]);
    assert_eq!(
        tokenizer.encode("床"),
        vec![
            4 + 5
                + distinct
                    .iter()
                    .filter(|&&c| c < '床' && !"明月头，。".contains(c))
                    .count()
        ]
    );

    let dir = temp_dir("char-tokenizer");
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path).unwrap();
    let loaded = Tokenizer::load(&path).unwrap();
    assert_eq!(loaded.encode(docs[1]), tokenizer.encode(docs[1]));
    assert_eq!(loaded.vocab_size(), tokenizer.vocab_size());
}

#[test]
fn min_freq_turns_rare_characters_into_unk() {
    let tokenizer = Tokenizer::Char(CharTokenizer::build(["aab"].into_iter(), 2));
    assert_eq!(tokenizer.encode("ab"), vec![4, UNK]);
}

#[test]
fn the_bpe_tokenizer_round_trips_and_saves() {
    let text = "the quick brown fox jumps over the lazy dog and the quick cat";
    let docs: Vec<String> = (0..50).map(|i| format!("{text} {i}")).collect();
    let tokenizer = Tokenizer::train_bpe(docs.iter().map(String::as_str), 300).unwrap();
    let sample = "the lazy fox jumps";
    let ids = tokenizer.encode(sample);
    assert!(ids.len() < sample.len(), "BPE should merge: {ids:?}");
    assert_eq!(tokenizer.decode(&ids), sample);
    let dir = temp_dir("bpe-tokenizer");
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path).unwrap();
    let loaded = Tokenizer::load(&path).unwrap();
    assert_eq!(loaded.encode(sample), ids);
}

#[test]
fn a_broken_tokenizer_file_is_named() {
    let dir = temp_dir("broken-tokenizer");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, "{\"kind\": \"char\", \"tokens\": [\"a\"]}").unwrap();
    let message = Tokenizer::load(&path).unwrap_err().to_string();
    assert!(
        message.contains("tokenizer.json") && message.contains("<pad>"),
        "{message}"
    );
}

/// `hf_json` (what `export` writes as a Hugging Face folder's `tokenizer.json`), read back by
/// the `tokenizers` crate as transformers and `generate --hf` read it, encodes a prompt as our
/// tokenizer does (`<bos>` first, unknown characters as `<unk>`) and decodes text it knows
/// back, for the character vocabulary and for byte-level BPE.
#[test]
fn the_exported_tokenizer_json_encodes_as_ours() {
    let docs = ["床前明月光，疑是地上霜。", "举头望明月，\n低头思故乡。"];
    let text = "the quick brown fox jumps over the lazy dog";
    let english: Vec<String> = (0..50).map(|i| format!("{text} {i}")).collect();
    let cases = [
        (
            Tokenizer::Char(CharTokenizer::build(docs.iter().copied(), 1)),
            "明月\n光龍霜",
        ),
        (
            Tokenizer::train_bpe(english.iter().map(String::as_str), 300).unwrap(),
            "the lazy fox 7",
        ),
    ];
    for (ours, sample) in cases {
        let json = ours.hf_json().unwrap();
        let theirs: tokenizers::Tokenizer = json.parse().unwrap();
        let encoded = theirs.encode(sample, true).unwrap();
        let ids: Vec<usize> = encoded.get_ids().iter().map(|&id| id as usize).collect();
        assert_eq!(ids, ours.encode_prompt(sample), "{sample}");
        let known: String = sample.chars().filter(|&c| c != '龍').collect();
        let encoded = theirs.encode(known.as_str(), true).unwrap();
        assert_eq!(theirs.decode(encoded.get_ids(), true).unwrap(), known);
    }
}
