//! Aspect-ratio buckets as kohya's sd-scripts builds them (DESIGN.md §4):
//! about resolution^2 pixels each, sides in steps, both orientations and
//! the square. An image goes to the bucket nearest its aspect ratio, is
//! centre-cropped to that ratio and resized to the bucket (Lanczos3).
use image::imageops::{self, FilterType};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::data::config::DataConfig;

/// The resize filter; part of every latent's cache key.
pub const FILTER: FilterType = FilterType::Lanczos3;
pub const FILTER_NAME: &str = "lanczos3";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bucket {
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}", self.width, self.height)
    }
}

/// The source rectangle (upright pixels) that becomes the bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Crop {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Buckets {
    pub resolution: u32,
    pub min: u32,
    pub max: u32,
    pub step: u32,
    pub no_upscale: bool,
    /// The predefined buckets, sorted by (width, height).
    pub list: Vec<Bucket>,
}

impl Buckets {
    pub fn new(cfg: &DataConfig) -> Self {
        let (res, min, max, step) = (cfg.resolution, cfg.min_bucket, cfg.max_bucket, cfg.bucket_step);
        let area = res as u64 * res as u64;
        let mut list = Vec::new();
        let square = (res / step) * step;
        list.push(Bucket { width: square, height: square });
        let mut w = min;
        while w <= max {
            let h = (max as u64).min(area / w as u64 / step as u64 * step as u64) as u32;
            if h >= min {
                list.push(Bucket { width: w, height: h });
                list.push(Bucket { width: h, height: w });
            }
            w += step;
        }
        list.sort();
        list.dedup();
        Buckets { resolution: res, min, max, step, no_upscale: cfg.no_upscale, list }
    }

    /// The bucket for an upright `w`×`h` image.
    pub fn assign(&self, w: u32, h: u32) -> Bucket {
        if self.no_upscale {
            return self.no_upscale_bucket(w, h);
        }
        let ar = w as f64 / h as f64;
        let mut best = self.list[0];
        let mut best_err = f64::INFINITY;
        for &b in &self.list {
            let err = (b.width as f64 / b.height as f64 - ar).abs();
            if err < best_err {
                best = b;
                best_err = err;
            }
        }
        best
    }

    /// kohya's `bucket_no_upscale`: images over the area are scaled down to
    /// it keeping their ratio, smaller ones keep their size; then both sides
    /// are rounded down to the step.
    fn no_upscale_bucket(&self, w: u32, h: u32) -> Bucket {
        let area = self.resolution as f64 * self.resolution as f64;
        let step = self.step as f64;
        let ar = w as f64 / h as f64;
        let (rw, rh) = if (w as f64) * (h as f64) > area {
            let rw = (area * ar).sqrt();
            let rh = area / rw;
            let round = |x: f64| (x / step + 0.5).floor() * step;
            let bw = round(rw);
            let bh_w = round(bw / ar);
            let bh = round(rh);
            let bw_h = round(bh * ar);
            if (bw / bh_w - ar).abs() <= (bw_h / bh - ar).abs() {
                (bw, (bw / ar + 0.5).floor())
            } else {
                ((bh * ar + 0.5).floor(), bh)
            }
        } else {
            (w as f64, h as f64)
        };
        let side = |x: f64| {
            let s = (x as u32 / self.step) * self.step;
            s.clamp(self.step, self.max)
        };
        Bucket { width: side(rw), height: side(rh) }
    }
}

/// The centred rectangle of a `w`×`h` image with the bucket's aspect ratio.
pub fn crop_for(w: u32, h: u32, bucket: Bucket) -> Crop {
    let (bw, bh) = (bucket.width as u64, bucket.height as u64);
    if w as u64 * bh > h as u64 * bw {
        // Wider than the bucket: cut the sides.
        let cw = ((h as u64 * bw + bh / 2) / bh).clamp(1, w as u64) as u32;
        Crop { left: (w - cw) / 2, top: 0, width: cw, height: h }
    } else {
        let ch = ((w as u64 * bh + bw / 2) / bw).clamp(1, h as u64) as u32;
        Crop { left: 0, top: (h - ch) / 2, width: w, height: ch }
    }
}

/// Below this share of an image's area kept by its crop, prepare warns: more
/// than half the picture never reaches training.
pub const CROP_WARNING_KEPT: f64 = 0.5;

/// The share of a `w`×`h` image's area that `crop` keeps.
pub fn kept_fraction(w: u32, h: u32, crop: Crop) -> f64 {
    (crop.width as f64 * crop.height as f64) / (w as f64 * h as f64).max(1.0)
}

/// The bytes cropping and resizing to `bucket` adds: the float RGBA image
/// the vertical pass writes (the crop's width by the bucket's height).
pub fn resize_bytes(crop: Crop, bucket: Bucket) -> u64 {
    crop.width as u64 * bucket.height as u64 * 16 + bucket.width as u64 * bucket.height as u64 * 3
}

/// Crops then resizes to exactly the bucket's size.
pub fn crop_and_resize(image: &RgbImage, crop: Crop, bucket: Bucket) -> RgbImage {
    let view = imageops::crop_imm(image, crop.left, crop.top, crop.width, crop.height);
    if crop.width == bucket.width && crop.height == bucket.height {
        return view.to_image();
    }
    imageops::resize(&*view, bucket.width, bucket.height, FILTER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd() -> Buckets {
        Buckets::new(&DataConfig::default())
    }

    #[test]
    fn kohya_buckets_at_512() {
        let b = sd();
        for (w, h) in [(512, 512), (256, 1024), (1024, 256), (448, 576), (576, 448), (384, 640), (640, 384), (768, 320)]
        {
            assert!(b.list.contains(&Bucket { width: w, height: h }), "{w}x{h} missing from {:?}", b.list);
        }
        for bucket in &b.list {
            assert!(bucket.width as u64 * bucket.height as u64 <= 512 * 512, "{bucket}");
            assert_eq!((bucket.width % 64, bucket.height % 64), (0, 0));
        }
    }

    #[test]
    fn the_sdxl_default_at_1024_is_kohyas_table() {
        // model_util.make_bucket_resolutions((1024, 1024)) with kohya's default
        // min/max bucket (256, 1024) and step 64, run in Python.
        let kohya = [
            (256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 1024), (640, 1024),
            (704, 1024), (768, 1024), (832, 1024), (896, 1024), (960, 1024), (1024, 256), (1024, 320),
            (1024, 384), (1024, 448), (1024, 512), (1024, 576), (1024, 640), (1024, 704), (1024, 768),
            (1024, 832), (1024, 896), (1024, 960), (1024, 1024),
        ];
        let cfg = DataConfig { resolution: crate::data::config::SDXL_RESOLUTION, ..DataConfig::default() };
        let got: Vec<(u32, u32)> = Buckets::new(&cfg).list.iter().map(|b| (b.width, b.height)).collect();
        assert_eq!(got, kohya);
    }

    #[test]
    fn nearest_aspect_ratio_wins() {
        let b = sd();
        assert_eq!(b.assign(1000, 1000), Bucket { width: 512, height: 512 });
        assert_eq!(b.assign(3000, 2000), Bucket { width: 640, height: 384 }); // 1.5 -> 1.67 beats 1.29
        assert_eq!(b.assign(2000, 3000), Bucket { width: 384, height: 640 });
    }

    #[test]
    fn no_upscale_keeps_small_images_small() {
        let cfg = DataConfig { no_upscale: true, ..DataConfig::default() };
        let b = Buckets::new(&cfg);
        assert_eq!(b.assign(300, 200), Bucket { width: 256, height: 192 });
        let big = b.assign(4000, 3000);
        assert!(big.width as u64 * big.height as u64 <= 512 * 512 + 64 * 512, "{big}");
        assert_eq!((big.width % 64, big.height % 64), (0, 0));
    }

    #[test]
    fn crop_is_centred_with_the_bucket_ratio() {
        let c = crop_for(300, 100, Bucket { width: 64, height: 64 });
        assert_eq!(c, Crop { left: 100, top: 0, width: 100, height: 100 });
        let c = crop_for(100, 300, Bucket { width: 64, height: 128 });
        assert_eq!(c, Crop { left: 0, top: 50, width: 100, height: 200 });
        assert!((kept_fraction(300, 100, crop_for(300, 100, Bucket { width: 64, height: 64 })) - 1.0 / 3.0).abs() < 1e-9);
        let sliver = crop_for(30000, 200, Bucket { width: 1024, height: 256 });
        assert_eq!((sliver.width, sliver.height), (800, 200));
        assert!(kept_fraction(30000, 200, sliver) < 0.03);
        let img = RgbImage::new(300, 100);
        assert_eq!(
            crop_and_resize(
                &img,
                crop_for(300, 100, Bucket { width: 64, height: 64 }),
                Bucket { width: 64, height: 64 }
            )
            .dimensions(),
            (64, 64)
        );
    }
}
