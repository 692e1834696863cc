//! The CLIP tokenizer the binary carries: the built-in model's `vocab.json`
//! and `merges.txt`, which are CLIP's own BPE files (49408 entries, shared
//! by SD1's OpenAI CLIP and SD2's OpenCLIP tokenizers). A single file with
//! no tokenizer beside it and none in the Hugging Face cache (offline, or
//! the download failed) is tokenized with them, padded as its family's
//! tokenizer pads: SD1 with EOS, SD2 with `!` (id 0); SDXL's two tokenizers
//! pad as SD1's and SD2's do.
use std::path::Path;

use anyhow::{Context, Result};

use super::builtin;
use super::single_file::Family;
use crate::models::tokenizer::ClipTokenizer;

/// How the files are named in errors (they never come from disk).
const SHOWN: &str = "sdtune's bundled CLIP tokenizer";

/// The pad token of the family's own tokenizer.
pub fn pad_token(family: Family) -> &'static str {
    match family {
        Family::Sd1 | Family::Sdxl => "<|endoftext|>",
        Family::Sd2 => "!",
    }
}

/// The bundled tokenizer, padded as `family`'s tokenizer pads.
pub fn tokenizer(family: Family) -> Result<ClipTokenizer> {
    let text = |name: &str| -> Result<&'static str> {
        let bytes = builtin::embedded(&format!("tokenizer/{name}"))
            .with_context(|| format!("the built-in model carries no tokenizer/{name}"))?;
        std::str::from_utf8(bytes).with_context(|| format!("the built-in tokenizer/{name} is not UTF-8"))
    };
    ClipTokenizer::from_bpe(text("vocab.json")?, text("merges.txt")?, pad_token(family), Path::new(SHOWN))
}

/// The one line saying the bundled tokenizer is used for `checkpoint`, and why.
pub fn notice(checkpoint: &Path, family: Family, why: &str) -> String {
    format!(
        "{} has no tokenizer beside it and {why}; using sdtune's bundled CLIP tokenizer (CLIP's own BPE files, padded with {:?} as {}'s is)",
        checkpoint.display(),
        pad_token(family),
        match family {
            Family::Sd1 => "SD1",
            Family::Sd2 => "SD2",
            Family::Sdxl => "SDXL",
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_clips_vocabulary() {
        let vocab: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(builtin::embedded("tokenizer/vocab.json").unwrap()).unwrap();
        assert_eq!(vocab.len(), 49408);
        assert_eq!(vocab["!"], 0);
        assert_eq!(vocab["<|startoftext|>"], 49406);
        assert_eq!(vocab["<|endoftext|>"], 49407);
        let merges = std::str::from_utf8(builtin::embedded("tokenizer/merges.txt").unwrap()).unwrap();
        // 49408 = 256 bytes + 256 bytes with </w> + the merges + BOS and EOS.
        assert_eq!(merges.trim().lines().filter(|l| !l.starts_with("#version")).count(), 49408 - 512 - 2);
    }

    #[test]
    fn pads_as_each_family_does() {
        let sd1 = tokenizer(Family::Sd1).unwrap();
        let sd2 = tokenizer(Family::Sd2).unwrap();
        assert_eq!(sd1.pad_id(), 49407);
        assert_eq!(sd2.pad_id(), 0);
        for t in [&sd1, &sd2] {
            assert_eq!((t.bos_id(), t.eos_id()), (49406, 49407));
        }
        let ids = sd2.encode("a photo").ids;
        assert_eq!((ids[0], ids[3], ids[76]), (49406, 49407, 0));
    }
}
