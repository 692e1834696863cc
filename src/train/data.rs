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
    /// Sample `index` as training sample `global` of the run sees it
    /// (a shuffled caption); the plain sample unless the data says otherwise.
    fn sample_for(&self, index: usize, flip: bool, _global: u64) -> Result<TrainSample> {
        self.sample(index, flip)
    }
    /// Whether flipped copies were cached.
    fn has_flips(&self) -> bool;
    /// Conditioning of the empty caption (a batch of one), for caption dropout.
    fn empty_caption(&self) -> Result<Conditioning>;
    /// SDXL's time ids of sample `index` (original size, crop top-left,
    /// target size), flipped when `flip` is; `None` where the data has no
    /// image sizes (a UNet that needs them then refuses to train).
    fn time_ids(&self, _index: usize, _flip: bool) -> Result<Option<[f32; 6]>> {
        Ok(None)
    }
    /// Times sample `index` is seen per epoch (its concept's repeats).
    fn repeats(&self, _index: usize) -> usize {
        1
    }
    /// The caption of sample `index` as it was encoded (training the text
    /// encoder encodes it again each step).
    fn caption(&self, index: usize) -> Result<String> {
        anyhow::bail!("this training data keeps no caption of sample {index}, which training the text encoder needs")
    }
    /// Multiplies the loss of sample `index` (its concept's loss weight).
    fn loss_weight(&self, _index: usize) -> f64 {
        1.0
    }
    /// The items of regularisation (class) sets, for the prior-preservation
    /// loss (never in [`Self::buckets`]); none unless the data has some.
    fn class_items(&self) -> Vec<usize> {
        Vec::new()
    }
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

/// The micro-batches of one epoch when an optimizer step takes `parts` of
/// them (grad-accum x processes): the epoch's batches of `batch_size x
/// parts` (as [`epoch_batches`]), each cut into `parts` micro-batches of
/// `batch_size`. So a step holds the same samples however it is split;
/// the micro-batches of a bucket's short last batch may be short or empty.
pub fn epoch_micro_batches(buckets: &[Vec<usize>], batch_size: usize, parts: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
    let (batch_size, parts) = (batch_size.max(1), parts.max(1));
    epoch_batches(buckets, batch_size * parts, seed, epoch)
        .into_iter()
        .flat_map(|batch| (0..parts).map(move |p| batch.iter().skip(p * batch_size).take(batch_size).copied().collect::<Vec<_>>()))
        .collect()
}

/// Each bucket with every index `repeats(index)` times, as kohya lays out
/// an epoch: an image of N repeats is drawn N times, each bucket still
/// apart. With every repeat 1 the buckets are returned as they are.
pub fn with_repeats(buckets: &[Vec<usize>], repeats: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    buckets
        .iter()
        .map(|bucket| bucket.iter().flat_map(|&i| std::iter::repeat_n(i, repeats(i))).collect())
        .collect()
}

/// Per-sample losses `[n]` times each sample's loss weight, untouched
/// (not even multiplied by 1) when every weight is 1.
pub fn weight_samples(per_sample: Tensor, weights: &[f64]) -> Tensor {
    if weights.iter().all(|&w| w == 1.0) {
        return per_sample;
    }
    let weights = Tensor::from_slice(weights).to_kind(per_sample.kind()).to_device(per_sample.device());
    per_sample * weights
}

/// Batches per epoch (independent of the shuffle).
pub fn batches_per_epoch(buckets: &[Vec<usize>], batch_size: usize) -> usize {
    buckets.iter().map(|b| b.len().div_ceil(batch_size.max(1))).sum()
}

/// Micro-batches per epoch of [`epoch_micro_batches`].
pub fn micro_batches_per_epoch(buckets: &[Vec<usize>], batch_size: usize, parts: usize) -> usize {
    batches_per_epoch(buckets, batch_size.max(1) * parts.max(1)) * parts.max(1)
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

    #[test]
    fn a_step_holds_the_same_samples_however_it_is_split() {
        let buckets = vec![(0..7).collect::<Vec<_>>(), (7..12).collect()];
        let whole = epoch_batches(&buckets, 4, 5, 2);
        let split = epoch_micro_batches(&buckets, 2, 2, 5, 2);
        assert_eq!(split.len(), micro_batches_per_epoch(&buckets, 2, 2));
        assert_eq!(split.len(), 2 * whole.len());
        for (batch, parts) in whole.iter().zip(split.chunks(2)) {
            assert_eq!(batch, &parts.concat(), "a step's micro-batches are its batch cut in order");
        }
        assert_eq!(epoch_micro_batches(&buckets, 2, 1, 5, 2), epoch_batches(&buckets, 2, 5, 2));
    }

    #[test]
    fn repeats_are_honoured_exactly_in_every_epoch() {
        // Two concepts: images 0..4 with 10 repeats, 4..9 with 2, over two buckets.
        let buckets = vec![vec![0, 1, 4, 5, 6], vec![2, 3, 7, 8]];
        let repeats = |i: usize| if i < 4 { 10 } else { 2 };
        let epoch = with_repeats(&buckets, repeats);
        assert_eq!(batches_per_epoch(&epoch, 3), 9 + 8);
        let mut draws = [0usize; 9];
        for e in 0..2 {
            let batches = epoch_batches(&epoch, 3, 7, e);
            for batch in &batches {
                let first = buckets.iter().position(|b| b.contains(&batch[0])).unwrap();
                assert!(batch.iter().all(|i| buckets[first].contains(i)), "a batch mixed buckets: {batch:?}");
                for &i in batch {
                    draws[i] += 1;
                }
            }
        }
        assert_eq!(draws, [20, 20, 20, 20, 4, 4, 4, 4, 4]);
        let (big, small): (usize, usize) = (draws[..4].iter().sum(), draws[4..].iter().sum());
        assert_eq!((big, small), (80, 20), "concept draws are images x repeats");
    }

    #[test]
    fn single_repeats_leave_the_epoch_as_it_was() {
        let buckets = vec![(0..7).collect::<Vec<_>>(), (7..12).collect()];
        let same = with_repeats(&buckets, |_| 1);
        assert_eq!(same, buckets);
        assert_eq!(epoch_batches(&same, 2, 5, 3), epoch_batches(&buckets, 2, 5, 3));
    }

    #[test]
    fn loss_weights_scale_each_sample() {
        let per_sample = Tensor::from_slice(&[1.0f32, 2.0, 4.0]);
        let weighted = weight_samples(per_sample.shallow_clone(), &[1.0, 3.0, 0.5]);
        assert_eq!(Vec::<f32>::try_from(&weighted).unwrap(), [1.0, 6.0, 2.0]);
        assert_eq!(weighted.mean(tch::Kind::Float).double_value(&[]), 3.0);
        let untouched = weight_samples(per_sample.shallow_clone(), &[1.0, 1.0, 1.0]);
        assert_eq!(untouched.data_ptr(), per_sample.data_ptr(), "weights of 1 add no work");
    }
}
