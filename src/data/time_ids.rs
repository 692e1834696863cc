//! SDXL's six size numbers of a training image, as kohya's sd-scripts
//! makes them (`train_util.py`: `BucketManager.get_crop_ltrb` and the
//! batch's `original_sizes_hw` / `crop_top_lefts` / `target_sizes_hw`):
//! original size (h, w), crop top-left (top, left), target size (h, w).
//!
//! kohya's "crop" is where the image, scaled to fit *inside* its bucket,
//! would sit centred in it (Stability AI's preprocessing, says its
//! comment), not the rows or columns the cover-and-crop resize cuts off; a
//! flipped image measures its left from the right edge. LoRAs trained with
//! kohya saw these numbers, so sdtune gives the same ones.
use super::buckets::Bucket;

/// `[original h, original w, crop top, crop left, target h, target w]` of
/// an upright `width`×`height` image in `bucket`, `flipped` horizontally or not.
pub fn kohya_time_ids(width: u32, height: u32, bucket: Bucket, flipped: bool) -> [f32; 6] {
    let (bw, bh) = (bucket.width as f64, bucket.height as f64);
    let image_ar = width as f64 / height as f64;
    // get_crop_ltrb, in Python's float arithmetic: `//` floors.
    let (resized_w, resized_h) = if bw / bh > image_ar { (bh * image_ar, bh) } else { (bw, bw / image_ar) };
    let left = ((bw - resized_w) / 2.0).floor();
    let top = ((bh - resized_h) / 2.0).floor();
    let right = left + resized_w;
    // int() of a non-negative float truncates.
    let left = if flipped { (bw - right).trunc() } else { left };
    [height as f32, width as f32, top as f32, left as f32, bh as f32, bw as f32]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(width: u32, height: u32) -> Bucket {
        Bucket { width, height }
    }

    // Expected values: kohya's get_crop_ltrb and collate code run in Python.
    #[test]
    fn an_image_of_the_buckets_ratio_has_no_offset() {
        assert_eq!(kohya_time_ids(2048, 2048, bucket(1024, 1024), false), [2048.0, 2048.0, 0.0, 0.0, 1024.0, 1024.0]);
        assert_eq!(kohya_time_ids(1024, 1024, bucket(1024, 1024), true), [1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]);
    }

    #[test]
    fn a_taller_image_offsets_its_left_and_a_wider_one_its_top() {
        // 1000x1500 in 1024x1024: fits as 682.67 wide, left = (1024 - 682.67) // 2 = 170.
        assert_eq!(kohya_time_ids(1000, 1500, bucket(1024, 1024), false), [1500.0, 1000.0, 0.0, 170.0, 1024.0, 1024.0]);
        // Flipped: 1024 - (170 + 682.67) = 171.33 -> 171.
        assert_eq!(kohya_time_ids(1000, 1500, bucket(1024, 1024), true), [1500.0, 1000.0, 0.0, 171.0, 1024.0, 1024.0]);
        // 1600x900 in 1216x832 (ar 1.4615 < 1.7778): fits as 1216 x 684, top = (832 - 684) // 2 = 74.
        assert_eq!(kohya_time_ids(1600, 900, bucket(1216, 832), false), [900.0, 1600.0, 74.0, 0.0, 832.0, 1216.0]);
        assert_eq!(kohya_time_ids(1600, 900, bucket(1216, 832), true), [900.0, 1600.0, 74.0, 0.0, 832.0, 1216.0]);
        assert_eq!(kohya_time_ids(128, 64, bucket(96, 32), true), [64.0, 128.0, 0.0, 16.0, 32.0, 96.0]);
    }
}
