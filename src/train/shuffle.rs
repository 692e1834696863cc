//! kohya's `shuffle_caption` with `keep_tokens` for tag captions: the
//! caption is split at commas, the first `keep_tokens` tags stay in place
//! and the rest are shuffled, per training sample, from (seed, global
//! sample index), then joined with ", ".
//!
//! Prepare caches one embedding per caption, so a shuffled caption is
//! encoded in the step by the model's own text encoder (no gradient); an
//! order equal to the cached caption takes the cached embedding. The text
//! encoder costs a fraction of the UNet's forward and backward, and needs
//! no cache of every order. While the text encoder trains, the caption is
//! encoded in the step anyway: `text_encoder.rs` tokenizes the shuffled
//! caption there (the same [`shuffled_caption`]) instead of this wrapper.
use anyhow::Result;
use tch::{Device, Kind};

use super::data::{derive_seed, SplitMix64, TrainSample, TrainingData};
use super::data_view::DataView;
use crate::models::conditioning::Conditioning;
use crate::models::text_stack::TextStack;

/// The random stream of the caption shuffles (training's draws use 1..=3).
const STREAM: u64 = 4;

/// `caption`'s comma-separated tags with all but the first `keep_tokens`
/// shuffled by `rng`, joined with ", " (kohya's order of operations).
pub fn shuffle_tags(caption: &str, keep_tokens: usize, rng: &mut SplitMix64) -> String {
    let tags: Vec<&str> = caption.trim().split(',').map(str::trim).collect();
    let keep = keep_tokens.min(tags.len());
    let (fixed, rest) = tags.split_at(keep);
    let mut rest = rest.to_vec();
    rng.shuffle(&mut rest);
    fixed.iter().chain(&rest).copied().collect::<Vec<_>>().join(", ")
}

/// The caption training sample `global` of a run seeded `seed` reads in
/// place of `caption`: the same order whichever process draws the sample
/// and however often the run was resumed.
pub fn shuffled_caption(caption: &str, keep_tokens: usize, seed: u64, global: u64) -> String {
    let mut rng = SplitMix64::new(derive_seed(seed, STREAM, global));
    shuffle_tags(caption, keep_tokens, &mut rng)
}

/// The data with each sample's caption shuffled and encoded afresh.
pub struct ShuffledCaptions<'a> {
    pub data: &'a dyn TrainingData,
    pub text: &'a TextStack,
    pub keep_tokens: usize,
    pub seed: u64,
}

impl ShuffledCaptions<'_> {
    /// The caption training sample `global` of item `index` reads.
    pub fn caption_for(&self, index: usize, global: u64) -> Option<(String, String)> {
        // Data that keeps no caption (benchmarks' random cache) is not shuffled.
        let caption = self.data.caption(index).ok()?;
        let shuffled = shuffled_caption(&caption, self.keep_tokens, self.seed, global);
        Some((caption, shuffled))
    }
}

impl DataView for ShuffledCaptions<'_> {
    fn inner(&self) -> &dyn TrainingData {
        self.data
    }
    fn view_sample_for(&self, index: usize, flip: bool, global: u64) -> Result<TrainSample> {
        let mut sample = self.data.sample_for(index, flip, global)?;
        if let Some((caption, shuffled)) = self.caption_for(index, global) {
            if shuffled != caption {
                let encoded = tch::no_grad(|| self.text.encode(&[shuffled.as_str()], 0))?.conditioning;
                let cpu = encoded.to_device(Device::Cpu);
                sample.text = Conditioning {
                    text: cpu.text.to_kind(Kind::Float),
                    pooled: cpu.pooled.map(|p| p.to_kind(Kind::Float)),
                    time_ids: None,
                };
            }
        }
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_tags_stay_and_the_rest_is_a_permutation() {
        let caption = "acme, poster,  blue circle, orange, flat";
        let mut seen = std::collections::HashSet::new();
        for i in 0..20 {
            let mut rng = SplitMix64::new(derive_seed(7, STREAM, i));
            let out = shuffle_tags(caption, 2, &mut rng);
            assert!(out.starts_with("acme, poster, "), "{out}");
            let mut tags: Vec<&str> = out.split(", ").collect();
            tags.sort_unstable();
            assert_eq!(tags, ["acme", "blue circle", "flat", "orange", "poster"]);
            seen.insert(out);
        }
        assert!(seen.len() > 1, "20 samples all drew one order");
        let mut a = SplitMix64::new(derive_seed(7, STREAM, 3));
        let mut b = SplitMix64::new(derive_seed(7, STREAM, 3));
        assert_eq!(shuffle_tags(caption, 2, &mut a), shuffle_tags(caption, 2, &mut b), "the order follows (seed, index)");
        assert_eq!(shuffled_caption(caption, 2, 7, 3), shuffle_tags(caption, 2, &mut SplitMix64::new(derive_seed(7, STREAM, 3))));
        assert_eq!(shuffle_tags("one tag", 1, &mut a), "one tag");
        assert_eq!(shuffle_tags("a, b", 5, &mut a), "a, b", "keep_tokens beyond the tags keeps them all");
    }
}
