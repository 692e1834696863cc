//! The CLIP tokenizer against ids from transformers' slow CLIPTokenizer
//! (no ftfy), as diffusers' StableDiffusionPipeline pads them to 77.
use crate::common;

use std::path::Path;

use sdtune::models::tokenizer::{ClipTokenizer, MAX_TOKENS};
use serde_json::Value;

struct Case {
    prompt: String,
    sd1: Vec<i64>,
    sd2: Vec<i64>,
}

fn cases() -> Vec<Case> {
    let path = common::reference("tokenizer_ids.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &Value| -> Vec<i64> { v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect() };
    let cases: Vec<Case> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case { prompt: c["prompt"].as_str().unwrap().to_string(), sd1: ids(&c["sd1"]), sd2: ids(&c["sd2"]) })
        .collect();
    assert!(cases.len() >= 60, "only {} reference prompts", cases.len());
    cases
}

fn load(dir: &Path) -> ClipTokenizer {
    ClipTokenizer::from_folder(dir).unwrap_or_else(|e| panic!("{e:#}"))
}

fn tokenizer_dir(model: &str) -> std::path::PathBuf {
    common::fixtures().join(model).join("tokenizer")
}

/// Every prompt's 77 ids equal the reference; lists all that differ.
fn assert_parity(what: &str, tokenizer: &ClipTokenizer, expected: impl Fn(&Case) -> &[i64]) {
    let cases = cases();
    let mut failures = Vec::new();
    for case in &cases {
        let got = tokenizer.encode(&case.prompt).ids;
        let want = expected(case);
        assert_eq!(want.len(), MAX_TOKENS, "reference for {:?} is not 77 ids", case.prompt);
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            failures.push(format!("{:?}: first difference at {at}\n  got  {got:?}\n  want {want:?}", case.prompt));
        }
    }
    assert!(failures.is_empty(), "{what}: {} of {} prompts differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
    eprintln!("{what}: all {} prompts equal", cases.len());
}

#[test]
fn sd1_vocab_and_merges_match_reference() {
    assert_parity("sd1", &load(&tokenizer_dir("tiny-sd1")), |c| &c.sd1);
}

#[test]
fn sd2_folder_matches_reference() {
    assert_parity("sd2", &load(&tokenizer_dir("tiny-sd2")), |c| &c.sd2);
}

#[test]
fn sd2_tokenizer_json_alone_matches_reference() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tokenizer_dir("tiny-sd2").join(file), tmp.path().join(file)).unwrap();
    }
    assert_parity("sd2 from tokenizer.json", &load(tmp.path()), |c| &c.sd2);
}

#[test]
fn special_ids_follow_the_folder() {
    let sd1 = load(&tokenizer_dir("tiny-sd1"));
    let sd2 = load(&tokenizer_dir("tiny-sd2"));
    assert_eq!((sd1.bos_id(), sd1.eos_id(), sd1.pad_id()), (49406, 49407, 49407));
    assert_eq!((sd2.bos_id(), sd2.eos_id(), sd2.pad_id()), (49406, 49407, 0));
}

/// Over 75 tokens is cut to BOS + 75 + EOS and flagged; 75 or fewer is not.
#[test]
fn truncation_is_flagged() {
    let tokenizer = load(&tokenizer_dir("tiny-sd1"));
    let mut cut = 0;
    for case in cases() {
        let encoded = tokenizer.encode(&case.prompt);
        let count = tokenizer.token_count(&case.prompt);
        assert_eq!(encoded.truncated, count > MAX_TOKENS - 2, "{:?} has {count} tokens", case.prompt);
        if encoded.truncated {
            cut += 1;
            let full = tokenizer.token_ids(&case.prompt);
            assert_eq!(&case.sd1[1..MAX_TOKENS - 1], &full[..MAX_TOKENS - 2], "{:?}", case.prompt);
            assert_eq!(case.sd1[MAX_TOKENS - 1], tokenizer.eos_id());
        }
    }
    assert!(cut > 0, "no reference prompt is over 75 tokens");
    let long = "a photo of a red cat, ".repeat(20);
    assert!(tokenizer.encode(&long).truncated);
    assert!(!tokenizer.encode("a photo of a red cat").truncated);
}

#[test]
fn folder_without_vocab_files_is_an_error() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    let err = format!("{:#}", ClipTokenizer::from_folder(tmp.path()).err().expect("an error"));
    assert!(err.contains("vocab.json") && err.contains("tokenizer.json"), "{err}");
}

#[test]
fn corrupt_vocab_json_is_an_error_naming_it() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    std::fs::copy(tokenizer_dir("tiny-sd1").join("merges.txt"), tmp.path().join("merges.txt")).unwrap();
    std::fs::write(tmp.path().join("vocab.json"), "{\"a\": 1,").unwrap();
    let err = format!("{:#}", ClipTokenizer::from_folder(tmp.path()).err().expect("an error"));
    assert!(err.contains("vocab.json") && err.contains("not valid JSON"), "{err}");
}

#[test]
fn missing_merges_is_an_error_naming_it() {
    let tmp = sdtune::scratch::ScratchDir::new().unwrap();
    std::fs::copy(tokenizer_dir("tiny-sd1").join("vocab.json"), tmp.path().join("vocab.json")).unwrap();
    let err = format!("{:#}", ClipTokenizer::from_folder(tmp.path()).err().expect("an error"));
    assert!(err.contains("merges.txt"), "{err}");
}

/// Edge cases beyond the fixtures, each pinned against transformers 4.57 on Python 3.11.
#[test]
fn unicode_edge_cases_follow_python() {
    let sd1 = load(&tokenizer_dir("tiny-sd1"));
    let same = |a: &str, b: &str| assert_eq!(sd1.token_ids(a), sd1.token_ids(b), "{a:?} vs {b:?}");
    same("a\u{378}b", "ab"); // unassigned: dropped
    same("x \u{1FAE8}", "x"); // Unicode 15 emoji: unassigned in Python 3.11, dropped
    same("x\u{345}y", "x y"); // matches no class of the IGNORECASE pattern: skipped
    same("zero\u{200b}width", "zerowidth"); // format character: dropped
    same("tab\tline\nbreak", "tab line break");
    same("東京", "東 京"); // CJK ideographs stand alone
    same("CAFE\u{301}", "café"); // NFC, then lowercase
    same("<|ENDOFTEXT|>", "<|endoftext|>");
    // SD2's pad token `!` is an added token, split out as id 0 before BPE.
    let sd2 = load(&tokenizer_dir("tiny-sd2"));
    assert_eq!(sd2.token_ids("hi!").last(), Some(&0));
    assert_ne!(sd1.token_ids("hi!").last(), Some(&0));
}
