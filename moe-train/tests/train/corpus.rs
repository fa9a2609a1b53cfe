//! Corpus parsing and every bad input's error message.

use moe_train::config::CorpusChoice;
use moe_train::data::corpus::poetry::{self, FileShape};
use moe_train::data::corpus::text::{read_jsonl_file, read_text_file, split_documents};
use moe_train::data::split::split;
use moe_train::error::TrainError;

use crate::common::temp_dir;

#[test]
fn package_json_shapes_are_parsed() {
    let dir = temp_dir("shapes");
    let poems = dir.join("poet.tang.0.json");
    std::fs::write(
        &poems,
        r#"[{"author": "李白", "title": "静夜思", "id": "x", "paragraphs": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]},
            {"author": "无名", "title": "空", "paragraphs": []}]"#,
    )
    .unwrap();
    let docs = poetry::parse_file(&poems, FileShape::Poems).unwrap();
    assert_eq!(docs.len(), 1, "the empty poem is skipped");
    assert_eq!(
        docs[0].text,
        "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    );

    let anthology = dir.join("tangshisanbaishou.json");
    std::fs::write(
        &anthology,
        r#"{"title": "唐詩三百首", "content": [{"type": "五言絕句", "content": [
            {"chapter": "登鸛雀樓", "subchapter": null, "author": "王之渙", "paragraphs": ["白日依山盡，黃河入海流。", "欲窮千里目，更上一層樓。"]},
            {"chapter": "相思", "subchapter": null, "author": "王維", "paragraphs": ["紅豆生南國，春來發幾枝。"]}]}]}"#,
    )
    .unwrap();
    let docs = poetry::parse_file(&anthology, FileShape::Anthology).unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[1].text, "紅豆生南國，春來發幾枝。");

    let songs = dir.join("shijing.json");
    std::fs::write(
        &songs,
        r#"[{"title": "关雎", "chapter": "国风", "section": "周南", "content": ["关关雎鸠，在河之洲。", "窈窕淑女，君子好逑。"]}]"#,
    )
    .unwrap();
    let docs = poetry::parse_file(&songs, FileShape::Songs).unwrap();
    assert_eq!(docs[0].text, "关关雎鸠，在河之洲。\n窈窕淑女，君子好逑。");

    // A file in the wrong shape names the file and the line.
    let message = poetry::parse_file(&songs, FileShape::Anthology)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("shijing.json:1:") && message.contains("Anthology"),
        "{message}"
    );
}

#[test]
fn text_files_split_at_blank_lines() {
    let docs = split_documents("第一行\n第二行\n\n\n  \n第三篇\n");
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[0].text, "第一行\n第二行");
    assert_eq!(docs[1].text, "第三篇");
    assert_eq!(docs[1].line, 6);
}

#[test]
fn bad_text_files_name_the_file_and_line() {
    let dir = temp_dir("bad-text");
    let invalid = dir.join("invalid.txt");
    let mut bytes = "好诗\n第二行\n".as_bytes().to_vec();
    bytes.extend([0xff, 0xfe, b'\n']);
    std::fs::write(&invalid, bytes).unwrap();
    let error = read_text_file(&invalid).unwrap_err();
    assert!(
        matches!(error, TrainError::InvalidUtf8 { line: 3, .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("invalid.txt:3") && message.contains("UTF-8"),
        "{message}"
    );

    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n   \n\n").unwrap();
    let message = read_text_file(&empty).unwrap_err().to_string();
    assert!(
        message.contains("empty.txt") && message.contains("empty"),
        "{message}"
    );

    let missing = dir.join("missing.txt");
    let message = read_text_file(&missing).unwrap_err().to_string();
    assert!(message.contains("missing.txt"), "{message}");
}

#[test]
fn jsonl_files_are_read_and_errors_name_the_line() {
    let dir = temp_dir("jsonl");
    let good = dir.join("good.jsonl");
    std::fs::write(
        &good,
        "{\"text\": \"one\"}\n\n{\"text\": \"two\", \"other\": 1}\n",
    )
    .unwrap();
    let corpus = read_jsonl_file(&good, "text").unwrap();
    assert_eq!(corpus.documents.len(), 2);
    assert_eq!(corpus.documents[1].line, 3);

    let broken = dir.join("broken.jsonl");
    std::fs::write(&broken, "{\"text\": \"one\"}\n{\"text\": oops}\n").unwrap();
    let message = read_jsonl_file(&broken, "text").unwrap_err().to_string();
    assert!(
        message.contains("broken.jsonl:2") && message.contains("invalid JSON"),
        "{message}"
    );

    let message = read_jsonl_file(&good, "body").unwrap_err().to_string();
    assert!(
        message.contains("good.jsonl:1") && message.contains("no field `body`"),
        "{message}"
    );

    let not_string = dir.join("number.jsonl");
    std::fs::write(&not_string, "{\"text\": 5}\n").unwrap();
    let message = read_jsonl_file(&not_string, "text")
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("number.jsonl:1") && message.contains("not a string"),
        "{message}"
    );
}

#[test]
fn missing_npm_and_failing_npm_say_what_to_do() {
    let cache = temp_dir("no-npm");
    let message = poetry::load_with(CorpusChoice::Tang300, &cache, false, "/nonexistent/npm")
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("npm") && message.contains("--text FILE"),
        "{message}"
    );

    // An npm that fails as it does offline.
    let fake = cache.join("fake-npm");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'npm error network request failed: ENOTFOUND' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let message = poetry::load_with(CorpusChoice::Tang300, &cache, false, fake.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("offline")
            && message.contains("ENOTFOUND")
            && message.contains("--text FILE"),
        "{message}"
    );
    // Nothing half-downloaded is left behind.
    assert!(!cache.join("chinese-poetry-2.0.1.tgz").exists());
}

#[test]
fn a_tarball_with_the_wrong_checksum_is_refused_and_removed() {
    let cache = temp_dir("bad-checksum");
    let tarball = cache.join("chinese-poetry-2.0.1.tgz");
    std::fs::write(&tarball, b"not the package").unwrap();
    let message = poetry::load_with(CorpusChoice::Tang300, &cache, false, "/nonexistent/npm")
        .unwrap_err()
        .to_string();
    assert!(message.contains("checksum mismatch"), "{message}");
    assert!(!tarball.exists());
}

#[test]
fn the_split_is_deterministic_and_by_document() {
    let docs: Vec<_> = (0..100)
        .map(|i| moe_train::data::corpus::Document {
            text: format!("doc {i}"),
            line: i + 1,
        })
        .collect();
    let a = split(docs.clone(), 0.1, 1);
    let b = split(docs.clone(), 0.1, 1);
    let c = split(docs.clone(), 0.1, 2);
    assert_eq!(a.validation, b.validation);
    assert_eq!(a.train, b.train);
    assert_ne!(a.validation, c.validation);
    assert_eq!(a.validation.len(), 10);
    assert_eq!(a.train.len() + a.validation.len(), 100);
    // Every document lands in exactly one part.
    let mut all: Vec<_> = a
        .train
        .iter()
        .chain(&a.validation)
        .map(|d| d.line)
        .collect();
    all.sort();
    assert_eq!(all, (1..=100).collect::<Vec<_>>());
    // Two documents and a tiny fraction: still one held out.
    assert_eq!(split(docs[..2].to_vec(), 0.01, 3).validation.len(), 1);
}
