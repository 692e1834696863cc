//! CLIP BPE tokenizer, matching transformers' slow `CLIPTokenizer` as
//! diffusers' StableDiffusionPipeline runs it when `ftfy` is not installed:
//!
//! 1. split the prompt on the added (special) tokens, as `PreTrainedTokenizer.tokenize` does;
//! 2. clean each remaining piece like `BasicTokenizer(strip_accents=False,
//!    do_split_on_punc=False)`: drop control characters, spaces around CJK
//!    ideographs, NFC, whitespace split, lowercase;
//! 3. cut it with CLIP's regex, map bytes to unicode, run BPE with `</w>`;
//! 4. `[BOS] + first 75 + [EOS]`, padded to 77 with the folder's pad token.
//!
//! Unicode tables are the `regex` and `unicode-normalization` crates' (Unicode 16).
//! The reference runs Python 3.11 (Unicode 14), whose cleaning drops characters
//! it calls unassigned; `unassigned_in_python_3_11` drops the same ones.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

pub const MAX_TOKENS: usize = 77;

/// Prompt tokens that fit between BOS and EOS.
const MAX_PROMPT_TOKENS: usize = MAX_TOKENS - 2;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// transformers keeps only this many merges of `merges.txt` (49152 - 256 - 2);
/// CLIP's own file has exactly this many, so this only guards odd files.
const MAX_MERGES: usize = 49152 - 256 - 2;

/// CLIP's pre-tokenizer. transformers compiles it with IGNORECASE; in Python's
/// `regex` that leaves the letter and number classes as they are but takes
/// U+0345 (which folds to a letter) out of the last class, so it matches nothing
/// and is skipped. Rust's `(?i)` would fold U+0345 into the letters instead,
/// hence case folding only on the literals and U+0345 removed by hand.
const PATTERN: &str = r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}\x{345}]+";

/// A prompt as 77 ids, and whether it had to be cut.
pub struct Encoded {
    pub ids: Vec<i64>,
    pub truncated: bool,
}

/// A token matched in the raw prompt before any cleaning (BOS, EOS, the pad
/// token, ...). `lstrip`/`rstrip` eat the whitespace beside it.
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: i64,
    lstrip: bool,
    rstrip: bool,
}

/// A piece of the prompt after splitting on added tokens.
enum Piece<'a> {
    Added(i64),
    Text(&'a str),
}

pub struct ClipTokenizer {
    vocab: HashMap<String, i64>,
    /// `"left right"` -> rank; lower merges first.
    merge_ranks: HashMap<String, usize>,
    byte_chars: [char; 256],
    added: Vec<AddedToken>,
    pattern: Regex,
    /// Characters `BasicTokenizer._clean_text` drops: category C except \t\n\r, and U+FFFD.
    dropped_chars: Regex,
    /// Characters `_clean_text` turns into a space: \t\n\r and category Zs.
    space_chars: Regex,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    unk_id: i64,
}

impl ClipTokenizer {
    /// From a `tokenizer/` folder: `tokenizer.json`, or `vocab.json` + `merges.txt`.
    /// Special tokens come from `special_tokens_map.json` / `tokenizer_config.json`.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let files = read_model_files(dir)?;
        let config = SpecialTokens::read(dir)?;
        Self::build(files, config)
    }

    /// From CLIP's `vocab.json` and `merges.txt` as text (`shown` names them
    /// in errors), with CLIP's special tokens and `pad` as the pad token, as
    /// transformers' `CLIPTokenizer(vocab, merges, pad_token=pad)` builds it.
    pub fn from_bpe(vocab_json: &str, merges_txt: &str, pad: &str, shown: &Path) -> Result<Self> {
        let vocab_value: Value = serde_json::from_str(vocab_json)
            .with_context(|| format!("{} is not valid JSON", shown.join("vocab.json").display()))?;
        let vocab = parse_vocab(&shown.join("vocab.json"), &vocab_value)?;
        let merges = parse_merges(merges_txt, &shown.join("merges.txt"))?;
        let config = SpecialTokens::clip_with_pad(pad);
        Self::build(ModelFiles { vocab, merges, added: Vec::new() }, config)
    }

    /// The prompt as BOS, at most 75 tokens, EOS and padding: 77 ids.
    pub fn encode(&self, prompt: &str) -> Encoded {
        let tokens = self.token_ids(prompt);
        let truncated = tokens.len() > MAX_PROMPT_TOKENS;
        let mut ids = Vec::with_capacity(MAX_TOKENS);
        ids.push(self.bos_id);
        ids.extend(tokens.into_iter().take(MAX_PROMPT_TOKENS));
        ids.push(self.eos_id);
        ids.resize(MAX_TOKENS, self.pad_id);
        Encoded { ids, truncated }
    }

    /// BPE tokens of the prompt without BOS/EOS, before truncation (over 75 is cut).
    pub fn token_count(&self, prompt: &str) -> usize {
        self.token_ids(prompt).len()
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The prompt's token ids without BOS/EOS, untruncated.
    pub fn token_ids(&self, prompt: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for piece in self.split_added(prompt) {
            match piece {
                Piece::Added(id) => ids.push(id),
                Piece::Text(text) => self.push_text_ids(text, &mut ids),
            }
        }
        ids
    }

    fn build(files: ModelFiles, config: SpecialTokens) -> Result<Self> {
        let ModelFiles { vocab, merges, added: file_added } = files;
        let id_of = |content: &str| vocab.get(content).copied();
        let unk_id = id_of(&config.unk.content)
            .with_context(|| format!("the unknown token {:?} is not in the vocabulary", config.unk.content))?;
        let bos_id = id_of(&config.bos.content)
            .with_context(|| format!("the BOS token {:?} is not in the vocabulary", config.bos.content))?;
        let eos_id = id_of(&config.eos.content)
            .with_context(|| format!("the EOS token {:?} is not in the vocabulary", config.eos.content))?;
        let added = added_tokens(&config, file_added, &vocab, unk_id);
        let pad_id = added.iter().find(|t| t.content == config.pad.content).map_or(eos_id, |t| t.id);
        let merge_ranks = merges.into_iter().enumerate().map(|(rank, (a, b))| (format!("{a} {b}"), rank)).collect();
        Ok(Self {
            vocab,
            merge_ranks,
            byte_chars: bytes_to_unicode(),
            added,
            pattern: Regex::new(PATTERN).expect("CLIP pattern compiles"),
            dropped_chars: Regex::new(r"[[\p{C}\x{FFFD}]--[\t\n\r]]").expect("pattern compiles"),
            space_chars: Regex::new(r"[\t\n\r\p{Zs}]").expect("pattern compiles"),
            bos_id,
            eos_id,
            pad_id,
            unk_id,
        })
    }

    /// Cuts the prompt at each added token, leftmost then longest, as
    /// transformers' trie does, and strips the whitespace an added token asks for.
    fn split_added<'a>(&self, prompt: &'a str) -> Vec<Piece<'a>> {
        let mut pieces = Vec::new();
        let mut rest = prompt;
        let mut strip_next_left = false;
        while let Some((start, token)) = self.find_added(rest) {
            let mut before = &rest[..start];
            if strip_next_left {
                before = before.trim_start_matches(is_python_space);
            }
            if token.lstrip {
                before = before.trim_end_matches(is_python_space);
            }
            if !before.is_empty() {
                pieces.push(Piece::Text(before));
            }
            pieces.push(Piece::Added(token.id));
            strip_next_left = token.rstrip;
            rest = &rest[start + token.content.len()..];
        }
        if strip_next_left {
            rest = rest.trim_start_matches(is_python_space);
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest));
        }
        pieces
    }

    /// The first added token in `text` (the longest at that position).
    fn find_added(&self, text: &str) -> Option<(usize, &AddedToken)> {
        let mut best: Option<(usize, &AddedToken)> = None;
        for token in &self.added {
            let Some(start) = text.find(&token.content) else { continue };
            let better = match best {
                None => true,
                Some((s, b)) => start < s || (start == s && token.content.len() > b.content.len()),
            };
            if better {
                best = Some((start, token));
            }
        }
        best
    }

    /// Ids of a piece of prompt text with no added tokens in it.
    fn push_text_ids(&self, text: &str, ids: &mut Vec<i64>) {
        let cleaned = self.basic_clean(text);
        for word in self.pattern.find_iter(&cleaned) {
            for token in self.bpe(&self.byte_encode(word.as_str())) {
                ids.push(self.vocab.get(&token).copied().unwrap_or(self.unk_id));
            }
        }
    }

    /// `" ".join(BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize(text))`.
    fn basic_clean(&self, text: &str) -> String {
        let text = self.dropped_chars.replace_all(text, "");
        let text: String = text.chars().filter(|&c| !unassigned_in_python_3_11(c)).collect();
        let text = self.space_chars.replace_all(&text, " ");
        let text: String = space_out_cjk(&text).nfc().collect();
        // Python lowercases word by word; the final-sigma rule looks at
        // neighbours, so lowercasing the joined string could differ.
        let words: Vec<String> = text.split(is_python_space).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();
        words.join(" ")
    }

    /// Each UTF-8 byte as its printable stand-in character.
    fn byte_encode(&self, word: &str) -> String {
        word.bytes().map(|b| self.byte_chars[b as usize]).collect()
    }

    /// Byte-pair merges of one word, lowest rank first, with `</w>` on its last symbol.
    fn bpe(&self, word: &str) -> Vec<String> {
        // transformers' cache is seeded with these, so they stay whole without `</w>`.
        if word == BOS || word == EOS {
            return vec![word.to_string()];
        }
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        while symbols.len() > 1 {
            let Some((first, second)) = self.best_pair(&symbols) else { break };
            symbols = merge_pair(&symbols, &first, &second);
        }
        symbols
    }

    /// The adjacent pair with the lowest merge rank, if any pair has one.
    fn best_pair(&self, symbols: &[String]) -> Option<(String, String)> {
        symbols
            .windows(2)
            .filter_map(|w| self.merge_ranks.get(&format!("{} {}", w[0], w[1])).map(|&rank| (rank, w)))
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, w)| (w[0].clone(), w[1].clone()))
    }
}

/// Every `first second` neighbour pair joined, scanning left to right.
fn merge_pair(symbols: &[String], first: &str, second: &str) -> Vec<String> {
    let mut merged = Vec::with_capacity(symbols.len());
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && symbols[i] == first && symbols[i + 1] == second {
            merged.push(format!("{first}{second}"));
            i += 2;
        } else {
            merged.push(symbols[i].clone());
            i += 1;
        }
    }
    merged
}

/// Python's `str.isspace`: category Zs, or bidi class WS, B or S.
fn is_python_space(c: char) -> bool {
    matches!(c,
        '\t'..='\r' | '\x1c'..='\x1f' | ' ' | '\u{85}' | '\u{a0}' | '\u{1680}'
        | '\u{2000}'..='\u{200a}' | '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}')
}

/// `BasicTokenizer._tokenize_chinese_chars`: a space either side of each CJK ideograph.
fn space_out_cjk(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_cjk_ideograph(c) {
            out.push(' ');
            out.push(c);
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    out
}

/// The CJK blocks of `BasicTokenizer._is_chinese_char` (not kana or hangul).
fn is_cjk_ideograph(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// Whether Python 3.11's `unicodedata` (Unicode 14.0, the reference
/// environment's) calls `c` unassigned (Cn) while our Unicode 16 tables assign
/// it: `_clean_text` drops Cn, so e.g. the Unicode 15 emoji U+1FAE8 vanishes in
/// the reference. Python 3.12+ keeps some of these; we follow the fixtures' 3.11.
fn unassigned_in_python_3_11(c: char) -> bool {
    let c = c as u32;
    ASSIGNED_AFTER_UNICODE_14
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

/// Ranges that are Cn in Unicode 14.0 but assigned by Unicode 17.0, sorted
/// (generated from Python 3.11's `unicodedata` against the `regex` module).
#[rustfmt::skip]
const ASSIGNED_AFTER_UNICODE_14: &[(u32, u32)] = &[
    (0x0558, 0x0558), (0x058B, 0x058C), (0x05C8, 0x05C9), (0x088F, 0x088F), (0x0897, 0x0897), (0x0B53, 0x0B54),
    (0x0C5C, 0x0C5C), (0x0CDC, 0x0CDC), (0x0CF3, 0x0CF3), (0x0ECE, 0x0ECE), (0x1ACF, 0x1AF0), (0x1B4E, 0x1B4F),
    (0x1B7F, 0x1B7F), (0x1C89, 0x1C8A), (0x208F, 0x208F), (0x209D, 0x209F), (0x20C1, 0x20C4), (0x2427, 0x2429),
    (0x2B96, 0x2B96), (0x2E60, 0x2E63), (0x2FFC, 0x2FFF), (0x31E4, 0x31E5), (0x31EF, 0x31EF), (0xA7CB, 0xA7CF),
    (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4), (0xA7DA, 0xA7DD), (0xA7E2, 0xA7E2), (0xA7F1, 0xA7F1), (0xAB6C, 0xAB6D),
    (0xFBC3, 0xFBD2), (0xFD90, 0xFD91), (0xFDC8, 0xFDCE), (0x105C0, 0x105F3), (0x107BB, 0x107BF), (0x10940, 0x10959),
    (0x10D40, 0x10D65), (0x10D69, 0x10D85), (0x10D8E, 0x10D8F), (0x10EC2, 0x10EC7), (0x10EC9, 0x10EEE), (0x10EF0, 0x10EFF),
    (0x1123F, 0x11241), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5), (0x113B7, 0x113C0),
    (0x113C2, 0x113C2), (0x113C5, 0x113C5), (0x113C7, 0x113CA), (0x113CC, 0x113D5), (0x113D7, 0x113D8), (0x113E1, 0x113E2),
    (0x116D0, 0x116E3), (0x11B00, 0x11B0A), (0x11B60, 0x11B67), (0x11BC0, 0x11BE1), (0x11BF0, 0x11BF9), (0x11DB0, 0x11DDB),
    (0x11DE0, 0x11DE9), (0x11DF0, 0x11DF1), (0x11F00, 0x11F10), (0x11F12, 0x11F3A), (0x11F3E, 0x11F5A), (0x1246F, 0x1246F),
    (0x12475, 0x1247F), (0x12550, 0x12686), (0x1342F, 0x1342F), (0x13439, 0x13455), (0x13460, 0x143FA), (0x16100, 0x16139),
    (0x16D40, 0x16D79), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF6), (0x187F8, 0x187FF), (0x18CD6, 0x18CDA),
    (0x18CFF, 0x18CFF), (0x18D09, 0x18D20), (0x18D80, 0x18DF2), (0x18E00, 0x19191), (0x191A0, 0x191D2), (0x1B123, 0x1B128),
    (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1B168, 0x1B168), (0x1CC00, 0x1CCFC), (0x1CD00, 0x1CEB3), (0x1CEBA, 0x1CED0),
    (0x1CED2, 0x1CED4), (0x1CEDD, 0x1CEFD), (0x1D127, 0x1D128), (0x1D1EB, 0x1D1FF), (0x1D250, 0x1D281), (0x1D2C0, 0x1D2D3),
    (0x1D6A6, 0x1D6A6), (0x1DB00, 0x1DB1C), (0x1DF1F, 0x1DF81), (0x1DF90, 0x1DF96), (0x1DFCD, 0x1DFFF), (0x1E030, 0x1E06D),
    (0x1E08F, 0x1E08F), (0x1E4D0, 0x1E4F9), (0x1E5D0, 0x1E5FA), (0x1E5FF, 0x1E5FF), (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6F5),
    (0x1E6FE, 0x1E6FF), (0x1F1AE, 0x1F1AE), (0x1F6D8, 0x1F6D9), (0x1F6DC, 0x1F6DC), (0x1F774, 0x1F77F), (0x1F7D9, 0x1F7DB),
    (0x1F7F1, 0x1F7FF), (0x1F8B2, 0x1F8BB), (0x1F8C0, 0x1F8C1), (0x1F8D0, 0x1F8D8), (0x1FA54, 0x1FA57), (0x1FA75, 0x1FA77),
    (0x1FA87, 0x1FA8F), (0x1FAAD, 0x1FAAF), (0x1FABB, 0x1FABF), (0x1FAC6, 0x1FAC6), (0x1FAC8, 0x1FAC8), (0x1FACC, 0x1FACF),
    (0x1FADA, 0x1FADD), (0x1FADF, 0x1FADF), (0x1FAE8, 0x1FAEB), (0x1FAEF, 0x1FAEF), (0x1FAF7, 0x1FAFA), (0x1FBCB, 0x1FBEF),
    (0x1FBFA, 0x1FBFA), (0x2B739, 0x2B73F), (0x2B81E, 0x2B81E), (0x2CEA2, 0x2CEAD), (0x2EBF0, 0x2EE5D), (0x31350, 0x33479),
    (0x3D000, 0x3FC3F),
];

/// GPT-2's byte -> unicode table: printable bytes map to themselves, the rest
/// to 256, 257, ... in byte order, so no token holds whitespace or controls.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut table = ['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            next += 1;
            next - 1
        };
        table[b as usize] = char::from_u32(code).expect("valid code point");
    }
    table
}

/// The vocabulary and merges, and the added tokens `tokenizer.json` lists.
struct ModelFiles {
    vocab: HashMap<String, i64>,
    merges: Vec<(String, String)>,
    added: Vec<AddedToken>,
}

fn read_model_files(dir: &Path) -> Result<ModelFiles> {
    let tokenizer_json = dir.join("tokenizer.json");
    if tokenizer_json.is_file() {
        return read_tokenizer_json(&tokenizer_json);
    }
    let vocab_json = dir.join("vocab.json");
    if !vocab_json.is_file() {
        bail!(
            "{} has neither tokenizer.json nor vocab.json; point at a model's tokenizer/ folder",
            dir.display()
        );
    }
    let vocab = parse_vocab(&vocab_json, &read_json(&vocab_json)?)?;
    let merges = read_merges_txt(&dir.join("merges.txt"))?;
    Ok(ModelFiles { vocab, merges, added: Vec::new() })
}

/// HF tokenizers' format: `model.vocab`, `model.merges`, `added_tokens`.
fn read_tokenizer_json(path: &Path) -> Result<ModelFiles> {
    let json = read_json(path)?;
    let model = &json["model"];
    let vocab = parse_vocab(path, &model["vocab"])?;
    let merges = model["merges"]
        .as_array()
        .with_context(|| format!("{} has no model.merges list", path.display()))?
        .iter()
        .map(|m| parse_merge(path, m))
        .collect::<Result<_>>()?;
    let added = json["added_tokens"].as_array().map_or(Vec::new(), |list| {
        list.iter().filter_map(|t| added_token_spec(t)?.with_id(t["id"].as_i64())).collect()
    });
    Ok(ModelFiles { vocab, merges, added })
}

/// A merge written as `"a b"` or `["a", "b"]`.
fn parse_merge(path: &Path, merge: &Value) -> Result<(String, String)> {
    let pair = match merge {
        Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
        Value::Array(v) if v.len() == 2 => v[0].as_str().zip(v[1].as_str()).map(|(a, b)| (a.to_string(), b.to_string())),
        _ => None,
    };
    pair.with_context(|| format!("{} has a merge that is not \"a b\" or [\"a\", \"b\"]: {merge}", path.display()))
}

/// `token -> id`, from a JSON object.
fn parse_vocab(path: &Path, vocab: &Value) -> Result<HashMap<String, i64>> {
    let map = vocab.as_object().with_context(|| format!("{} has no vocabulary object", path.display()))?;
    map.iter()
        .map(|(token, id)| {
            let id = id.as_i64().with_context(|| format!("{} gives {token:?} a non-integer id", path.display()))?;
            Ok((token.clone(), id))
        })
        .collect()
}

/// `merges.txt`: a `#version` line, then one `a b` merge a line.
fn read_merges_txt(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read {} (a vocab.json folder needs merges.txt beside it)", path.display()))?;
    parse_merges(&text, path)
}

/// The merges of a `merges.txt` read from `path`.
fn parse_merges(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    let mut lines = text.trim().lines().peekable();
    if lines.peek().is_some_and(|l| l.starts_with("#version")) {
        lines.next();
    }
    lines
        .take(MAX_MERGES)
        .enumerate()
        .map(|(i, line)| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_string(), b.to_string())),
                _ => bail!("{} line {} is not a merge \"a b\": {line:?}", path.display(), i + 2),
            }
        })
        .collect()
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// How a special token is written in the config files.
#[derive(Debug, Clone)]
struct TokenSpec {
    content: String,
    lstrip: bool,
    rstrip: bool,
}

impl TokenSpec {
    fn plain(content: &str) -> Self {
        Self { content: content.to_string(), lstrip: false, rstrip: false }
    }

    fn with_id(self, id: Option<i64>) -> Option<AddedToken> {
        Some(AddedToken { content: self.content, id: id?, lstrip: self.lstrip, rstrip: self.rstrip })
    }
}

/// A token written as `"text"` or `{"content": "text", "lstrip": ..., "rstrip": ...}`.
fn added_token_spec(value: &Value) -> Option<TokenSpec> {
    match value {
        Value::String(s) => Some(TokenSpec::plain(s)),
        Value::Object(o) => Some(TokenSpec {
            content: o.get("content")?.as_str()?.to_string(),
            lstrip: o.get("lstrip").and_then(Value::as_bool).unwrap_or(false),
            rstrip: o.get("rstrip").and_then(Value::as_bool).unwrap_or(false),
        }),
        _ => None,
    }
}

/// BOS, EOS, UNK and PAD, plus the config's `added_tokens_decoder`.
struct SpecialTokens {
    bos: TokenSpec,
    eos: TokenSpec,
    unk: TokenSpec,
    pad: TokenSpec,
    decoder: Vec<AddedToken>,
}

impl SpecialTokens {
    /// `special_tokens_map.json` overrides `tokenizer_config.json`, as in
    /// transformers; CLIP's defaults fill the gaps (SD1 pads with EOS).
    fn read(dir: &Path) -> Result<Self> {
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?;
        let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let spec = |key: &str, default: &str| {
            [&map, &config]
                .into_iter()
                .find_map(|json| json.as_ref().and_then(|j| j.get(key)).and_then(added_token_spec))
                .unwrap_or_else(|| TokenSpec::plain(default))
        };
        let decoder = config.as_ref().map_or(Vec::new(), decoder_tokens);
        Ok(Self {
            bos: spec("bos_token", BOS),
            eos: spec("eos_token", EOS),
            unk: spec("unk_token", EOS),
            pad: spec("pad_token", EOS),
            decoder,
        })
    }

    /// CLIP's BOS, EOS and UNK (EOS) with `pad` as the pad token: what a
    /// tokenizer folder with only `pad_token` in its config gives.
    fn clip_with_pad(pad: &str) -> Self {
        Self {
            bos: TokenSpec::plain(BOS),
            eos: TokenSpec::plain(EOS),
            unk: TokenSpec::plain(EOS),
            pad: TokenSpec::plain(pad),
            decoder: Vec::new(),
        }
    }
}

/// `tokenizer_config.json`'s `added_tokens_decoder`: `{"id": {"content": ...}}`.
fn decoder_tokens(config: &Value) -> Vec<AddedToken> {
    let Some(decoder) = config.get("added_tokens_decoder").and_then(Value::as_object) else {
        return Vec::new();
    };
    decoder
        .iter()
        .filter_map(|(id, token)| added_token_spec(token)?.with_id(id.parse().ok()))
        .collect()
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Every token split out of the prompt before cleaning. transformers adds all
/// special tokens (so SD2's pad `!` is one) to those listed in the files; one
/// missing from the vocabulary reads as UNK.
fn added_tokens(
    config: &SpecialTokens,
    from_files: Vec<AddedToken>,
    vocab: &HashMap<String, i64>,
    unk_id: i64,
) -> Vec<AddedToken> {
    let mut added: Vec<AddedToken> = config.decoder.iter().cloned().chain(from_files).collect();
    for spec in [&config.bos, &config.eos, &config.unk, &config.pad] {
        if added.iter().any(|t| t.content == spec.content) {
            continue;
        }
        let id = vocab.get(&spec.content).copied().unwrap_or(unk_id);
        added.push(AddedToken { content: spec.content.clone(), id, lstrip: spec.lstrip, rstrip: spec.rstrip });
    }
    added.retain(|t| !t.content.is_empty());
    added
}
