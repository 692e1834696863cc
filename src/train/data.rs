//! What training reads: cached latent distributions and text embeddings,
//! grouped by bucket, in an order that depends only on the seed and epoch.
use anyhow::Result;
use tch::Tensor;

use crate::models::conditioning::Conditioning;

/// One training image as the cache holds it.
pub struct TrainSample {
    /// Latent distribution of the image (unscaled, as the VAE encoder gives it), [C, h, w].
    pub latent_mean: Tensor,
    pub latent_std: Tensor,
    /// Its caption's conditioning, a batch of one.
    pub text: Conditioning,
}

/// A source of training samples; the loop knows nothing of files.
pub trait TrainingData {
    /// Sample indices grouped by bucket (a batch never mixes buckets).
    fn buckets(&self) -> Vec<Vec<usize>>;
    /// Sample `index`, horizontally flipped when `flip` and the cache has a flipped copy.
    fn sample(&self, index: usize, flip: bool) -> Result<TrainSample>;
    /// Whether flipped copies were cached.
    fn has_flips(&self) -> bool;
    /// Conditioning of the empty caption (a batch of one), for caption dropout.
    fn empty_caption(&self) -> Result<Conditioning>;
}

/// SplitMix64: small, fast, and fully determined by its seed, so the data
/// order of any epoch can be recomputed on resume.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// A seed for anything random at (`seed`, `stream`, `index`), e.g. the noise
/// of micro-batch `index`: random draws never depend on what ran before,
/// so a resumed run draws exactly what an uninterrupted one would.
pub fn derive_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut rng = SplitMix64::new(seed ^ stream.wrapping_mul(0xA24B_AED4_963E_E407));
    for _ in 0..2 {
        rng.next_u64();
    }
    rng.next_u64() ^ SplitMix64::new(index.wrapping_add(stream)).next_u64()
}

/// The batches of one epoch: each bucket shuffled and cut into batches of
/// `batch_size` (the last one may be smaller), then the batches shuffled.
pub fn epoch_batches(buckets: &[Vec<usize>], batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(derive_seed(seed, 1, epoch));
    let mut batches = Vec::new();
    for bucket in buckets {
        let mut order = bucket.clone();
        rng.shuffle(&mut order);
        batches.extend(order.chunks(batch_size.max(1)).map(<[usize]>::to_vec));
    }
    rng.shuffle(&mut batches);
    batches
}

/// Batches per epoch (independent of the shuffle).
pub fn batches_per_epoch(buckets: &[Vec<usize>], batch_size: usize) -> usize {
    buckets.iter().map(|b| b.len().div_ceil(batch_size.max(1))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_reproducible_and_differ() {
        let buckets = vec![(0..7).collect::<Vec<_>>(), (7..12).collect()];
        let a = epoch_batches(&buckets, 2, 5, 0);
        assert_eq!(a, epoch_batches(&buckets, 2, 5, 0));
        assert_ne!(a, epoch_batches(&buckets, 2, 5, 1));
        assert_eq!(a.len(), batches_per_epoch(&buckets, 2));
        let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..12).collect::<Vec<_>>());
        for batch in &a {
            assert!(batch.iter().all(|&i| i < 7) || batch.iter().all(|&i| i >= 7), "a batch mixed buckets");
        }
    }
}
