//! Labelled image grids: rows are prompts, columns are seeds. Labels are
//! drawn with the bundled 8x8 bitmap font (font8x8), so no font file or
//! system font is needed.
use image::{Rgb, RgbImage};

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);

/// Geometry of a grid, exposed so tests can check the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GridGeometry {
    pub cell_width: u32,
    pub cell_height: u32,
    pub rows: u32,
    pub cols: u32,
    /// Pixels between cells and around the grid.
    pub pad: u32,
    /// Font scale (glyphs are 8x8 times this).
    pub scale: u32,
}

impl GridGeometry {
    pub fn new(cell_width: u32, cell_height: u32, rows: u32, cols: u32) -> Self {
        // Bigger glyphs for bigger images; 8 px text on a 512 px grid is unreadable.
        let scale = (cell_width / 128).clamp(1, 3);
        GridGeometry { cell_width, cell_height, rows, cols, pad: 4 * scale, scale }
    }

    /// Height of one line of text with its padding.
    pub fn label_height(&self) -> u32 {
        8 * self.scale + self.pad
    }

    pub fn width(&self) -> u32 {
        self.cols * (self.cell_width + self.pad) + self.pad
    }

    pub fn height(&self) -> u32 {
        self.label_height() + self.rows * (self.label_height() + self.cell_height + self.pad) + self.pad
    }

    /// Top-left corner of cell (row, col).
    pub fn cell_origin(&self, row: u32, col: u32) -> (u32, u32) {
        let x = self.pad + col * (self.cell_width + self.pad);
        let y = self.label_height() + self.pad + row * (self.label_height() + self.cell_height + self.pad) + self.label_height();
        (x, y)
    }
}

/// Lays `images[row][col]` out under column labels (e.g. "seed 42") with
/// each row's label (e.g. the prompt) above it. All images share one size.
pub fn compose(images: &[Vec<RgbImage>], row_labels: &[String], col_labels: &[String]) -> RgbImage {
    let rows = images.len() as u32;
    let cols = images.first().map_or(0, |r| r.len()) as u32;
    let (w, h) = images.first().and_then(|r| r.first()).map_or((1, 1), |i| i.dimensions());
    let g = GridGeometry::new(w, h, rows, cols);
    let mut canvas = RgbImage::from_pixel(g.width(), g.height(), BACKGROUND);
    for (c, label) in col_labels.iter().enumerate() {
        let (x, _) = g.cell_origin(0, c as u32);
        draw_text(&mut canvas, label, x, g.pad / 2, g.cell_width, g.scale);
    }
    for (r, row) in images.iter().enumerate() {
        let (x0, y0) = g.cell_origin(r as u32, 0);
        if let Some(label) = row_labels.get(r) {
            draw_text(&mut canvas, label, x0, y0 - g.label_height() + g.pad / 2, g.width() - 2 * g.pad, g.scale);
        }
        for (c, img) in row.iter().enumerate() {
            let (x, y) = g.cell_origin(r as u32, c as u32);
            image::imageops::overlay(&mut canvas, img, x as i64, y as i64);
        }
    }
    canvas
}

/// Characters of a column label that fit over a cell `cell_width` pixels wide.
pub fn label_chars(cell_width: u32) -> usize {
    let g = GridGeometry::new(cell_width, cell_width, 1, 1);
    (cell_width / (8 * g.scale)) as usize
}

/// Draws `text` at (x, y), cut with "..." to fit `max_width` pixels.
pub fn draw_text(canvas: &mut RgbImage, text: &str, x: u32, y: u32, max_width: u32, scale: u32) {
    let advance = 8 * scale;
    let fits = (max_width / advance) as usize;
    let chars: Vec<char> = text.chars().collect();
    let shown: Vec<char> = if chars.len() > fits && fits >= 3 {
        chars[..fits - 3].iter().copied().chain("...".chars()).collect()
    } else {
        chars.into_iter().take(fits).collect()
    };
    for (i, ch) in shown.into_iter().enumerate() {
        draw_glyph(canvas, glyph(ch), x + i as u32 * advance, y, scale);
    }
}

fn glyph(ch: char) -> [u8; 8] {
    let code = ch as usize;
    if code < 128 {
        font8x8::legacy::BASIC_LEGACY[code]
    } else if (0xA0..=0xFF).contains(&code) {
        font8x8::legacy::LATIN_LEGACY[code - 0xA0]
    } else {
        font8x8::legacy::BASIC_LEGACY['?' as usize]
    }
}

fn draw_glyph(canvas: &mut RgbImage, rows: [u8; 8], x: u32, y: u32, scale: u32) {
    for (gy, bits) in rows.iter().enumerate() {
        for gx in 0..8u32 {
            // font8x8 stores the leftmost pixel in the lowest bit.
            if bits >> gx & 1 == 0 {
                continue;
            }
            for dy in 0..scale {
                for dx in 0..scale {
                    let (px, py) = (x + gx * scale + dx, y + gy as u32 * scale + dy);
                    if px < canvas.width() && py < canvas.height() {
                        canvas.put_pixel(px, py, INK);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb([v, 0, 0]))
    }

    #[test]
    fn layout_places_every_image_in_its_cell() {
        let images = vec![vec![solid(64, 48, 10), solid(64, 48, 20), solid(64, 48, 30)], vec![
            solid(64, 48, 40),
            solid(64, 48, 50),
            solid(64, 48, 60),
        ]];
        let grid = compose(&images, &["red car".into(), "blue mug".into()], &["seed 1".into(), "seed 2".into(), "seed 3".into()]);
        let g = GridGeometry::new(64, 48, 2, 3);
        assert_eq!(grid.dimensions(), (g.width(), g.height()));
        for r in 0..2u32 {
            for c in 0..3u32 {
                let (x, y) = g.cell_origin(r, c);
                let want = 10 * (r * 3 + c + 1) as u8;
                assert_eq!(grid.get_pixel(x + 5, y + 5)[0], want, "cell ({r},{c})");
                assert_eq!(grid.get_pixel(x + 63, y + 47)[0], want, "cell ({r},{c}) corner");
            }
        }
    }

    #[test]
    fn labels_leave_ink_above_rows_and_columns() {
        let images = vec![vec![solid(64, 64, 200)]];
        let grid = compose(&images, &["A".into()], &["B".into()]);
        let g = GridGeometry::new(64, 64, 1, 1);
        let ink_in = |y0: u32, y1: u32| (y0..y1).any(|y| (0..grid.width()).any(|x| grid.get_pixel(x, y) == &INK));
        assert!(ink_in(0, g.label_height()), "column label missing");
        let (_, cell_y) = g.cell_origin(0, 0);
        assert!(ink_in(cell_y - g.label_height(), cell_y), "row label missing");
    }

    #[test]
    fn long_labels_are_cut_to_fit() {
        let mut canvas = RgbImage::from_pixel(100, 10, BACKGROUND);
        draw_text(&mut canvas, &"x".repeat(100), 0, 0, 40, 1);
        let inked_cols = (0..100).filter(|&x| (0..8).any(|y| canvas.get_pixel(x, y) == &INK)).max().unwrap();
        assert!(inked_cols < 40, "text ran past its width: {inked_cols}");
    }
}
