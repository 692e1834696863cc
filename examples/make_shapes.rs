//! Procedural, captioned image sets for the tiny demo model (no downloads).
//!
//!     cargo run --release --example make_shapes -- base  DIR [--count 4000] [--size 64] [--seed 1]
//!     cargo run --release --example make_shapes -- brand DIR [--count 24] [--size 128] [--seed 7]
//!     cargo run --release --example make_shapes -- vae   DIR [--count 4000] [--size 64] [--seed 3]
//!
//! `base`: the tiny base model's training set. A shape (circle, square,
//! triangle, star) in one of eight saturated colours on a plain background
//! of another, captioned "a red circle on a white background".
//!
//! `vae`: the VAE's training set, generic rather than captioned: any colour
//! (uniform in RGB), plain, striped, dotted or graded grounds, one to three
//! shapes. A VAE that only ever saw the base set's eight colours would map
//! every other colour onto them, and no LoRA could then teach a new palette.
//!
//! `brand`: the example brand set `datasets/example-brand/`, in one house
//! style the base set never shows: a cream ground with thin teal diagonal
//! stripes, a coral shape and a navy dot, captioned "tidewave style, a
//! circle" (`tidewave` is the trigger word).
//!
//! Every image is drawn with 4x4 supersampling, so edges are antialiased;
//! the same arguments always give the same files.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::{Rgb, RgbImage};
use sdtune::train::data::SplitMix64;

#[derive(Clone, Copy, Debug)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
}

const SHAPES: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }

    /// Whether the point (x, y), in the shape's own frame (centre 0, outer
    /// radius 1, y down), is inside it.
    fn contains(self, x: f64, y: f64) -> bool {
        match self {
            Shape::Circle => x * x + y * y <= 1.0,
            Shape::Square => x.abs() <= 0.8 && y.abs() <= 0.8,
            Shape::Triangle => in_polygon(&regular(3, 1.0, None), x, y),
            Shape::Star => in_polygon(&regular(5, 1.0, Some(0.45)), x, y),
        }
    }
}

/// Corners of a regular polygon pointing up (a star when `inner` is given).
fn regular(points: usize, outer: f64, inner: Option<f64>) -> Vec<(f64, f64)> {
    let step = std::f64::consts::PI / points as f64;
    let mut corners = Vec::new();
    for i in 0..2 * points {
        let r = match (i % 2, inner) {
            (0, _) => outer,
            (_, Some(r)) => r,
            (_, None) => continue,
        };
        let a = -std::f64::consts::FRAC_PI_2 + i as f64 * step;
        corners.push((r * a.cos(), r * a.sin() + if inner.is_none() { 0.2 } else { 0.05 }));
    }
    corners
}

/// Even-odd ray casting.
fn in_polygon(poly: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The base set's colours: saturated, far from the brand's muted palette.
const COLOURS: [(&str, [u8; 3]); 8] = [
    ("red", [215, 35, 35]),
    ("orange", [245, 135, 20]),
    ("yellow", [245, 215, 35]),
    ("green", [40, 165, 60]),
    ("blue", [35, 80, 215]),
    ("purple", [125, 50, 185]),
    ("white", [250, 250, 250]),
    ("black", [15, 15, 15]),
];

/// The example brand's palette.
const CREAM: [u8; 3] = [244, 233, 214];
const TEAL: [u8; 3] = [42, 157, 143];
const CORAL: [u8; 3] = [231, 111, 81];
const NAVY: [u8; 3] = [38, 70, 83];

/// One layer of a picture: what covers the point (u, v) in [0, 1)^2.
type Layer<'a> = Box<dyn Fn(f64, f64) -> Option<[u8; 3]> + 'a>;

/// Draws `layers` (last on top) over `ground` with 4x4 supersampling.
fn draw(size: u32, ground: [u8; 3], layers: &[Layer]) -> RgbImage {
    const SS: u32 = 4;
    RgbImage::from_fn(size, size, |px, py| {
        let mut sum = [0u32; 3];
        for sy in 0..SS {
            for sx in 0..SS {
                let u = (px as f64 + (sx as f64 + 0.5) / SS as f64) / size as f64;
                let v = (py as f64 + (sy as f64 + 0.5) / SS as f64) / size as f64;
                let colour = layers.iter().rev().find_map(|l| l(u, v)).unwrap_or(ground);
                for c in 0..3 {
                    sum[c] += colour[c] as u32;
                }
            }
        }
        Rgb(sum.map(|s| ((s + SS * SS / 2) / (SS * SS)) as u8))
    })
}

/// A shape of `colour` centred at (cx, cy) with outer radius `r`, turned by `angle`.
fn shape_layer<'a>(shape: Shape, cx: f64, cy: f64, r: f64, angle: f64, colour: [u8; 3]) -> Layer<'a> {
    let (sin, cos) = angle.sin_cos();
    Box::new(move |u, v| {
        let (dx, dy) = ((u - cx) / r, (v - cy) / r);
        let (x, y) = (cos * dx + sin * dy, -sin * dx + cos * dy);
        shape.contains(x, y).then_some(colour)
    })
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn uniform(rng: &mut SplitMix64, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The base set: `count` images, every (colour, shape, background) combination
/// equally often, position, size and a small turn drawn per image.
fn base(dir: &Path, count: usize, size: u32, seed: u64) -> Result<()> {
    let mut combos = Vec::new();
    for shape in SHAPES {
        for (fg, _) in COLOURS.iter().enumerate() {
            for (bg, _) in COLOURS.iter().enumerate() {
                if fg != bg {
                    combos.push((shape, fg, bg));
                }
            }
        }
    }
    let mut rng = SplitMix64::new(seed);
    for i in 0..count {
        let (shape, fg, bg) = combos[i % combos.len()];
        let r = uniform(&mut rng, 0.22, 0.34);
        let cx = uniform(&mut rng, 0.5 - (0.45 - r), 0.5 + (0.45 - r));
        let cy = uniform(&mut rng, 0.5 - (0.45 - r), 0.5 + (0.45 - r));
        let angle = uniform(&mut rng, -0.25, 0.25);
        let image = draw(size, COLOURS[bg].1, &[shape_layer(shape, cx, cy, r, angle, COLOURS[fg].1)]);
        let caption = format!("{} {} {} on {} {} background", article(COLOURS[fg].0), COLOURS[fg].0, shape.name(), article(COLOURS[bg].0), COLOURS[bg].0);
        write(dir, &format!("{i:05}"), &image, &caption)?;
    }
    println!("wrote {count} images ({} captions) to {}", combos.len(), dir.display());
    Ok(())
}

fn any_colour(rng: &mut SplitMix64) -> [u8; 3] {
    let mut c = [0u8; 3];
    for v in &mut c {
        *v = (rng.next_u64() % 256) as u8;
    }
    c
}

/// The VAE set: arbitrary colours and patterns, uncaptioned.
fn vae(dir: &Path, count: usize, size: u32, seed: u64) -> Result<()> {
    let mut rng = SplitMix64::new(seed);
    for i in 0..count {
        let ground = any_colour(&mut rng);
        let mut layers: Vec<Layer> = Vec::new();
        let (other, period, width, phase) =
            (any_colour(&mut rng), uniform(&mut rng, 0.08, 0.4), uniform(&mut rng, 0.15, 0.6), uniform(&mut rng, 0.0, 1.0));
        let (dx, dy) = {
            let a = uniform(&mut rng, 0.0, std::f64::consts::PI);
            (a.cos(), a.sin())
        };
        match rng.below(4) {
            0 => {}
            1 => layers.push(Box::new(move |u, v| (((u * dx + v * dy) / period + phase).fract() < width).then_some(other))),
            2 => layers.push(Box::new(move |u, v| {
                let (a, b) = ((u / period + phase).fract() - 0.5, (v / period + phase).fract() - 0.5);
                (a * a + b * b < width * width * 0.25).then_some(other)
            })),
            _ => layers.push(Box::new(move |u, v| {
                let t = ((u * dx + v * dy) * 0.7 + 0.15).clamp(0.0, 1.0);
                Some(std::array::from_fn(|c| (ground[c] as f64 * (1.0 - t) + other[c] as f64 * t) as u8))
            })),
        }
        for _ in 0..1 + rng.below(3) {
            let shape = SHAPES[rng.below(SHAPES.len())];
            let r = uniform(&mut rng, 0.08, 0.34);
            let (cx, cy) = (uniform(&mut rng, 0.1, 0.9), uniform(&mut rng, 0.1, 0.9));
            let angle = uniform(&mut rng, -3.2, 3.2);
            layers.push(shape_layer(shape, cx, cy, r, angle, any_colour(&mut rng)));
        }
        let png = dir.join(format!("{i:05}.png"));
        draw(size, ground, &layers).save(&png).with_context(|| format!("cannot write {}", png.display()))?;
    }
    println!("wrote {count} VAE training images to {}", dir.display());
    Ok(())
}

/// The brand set: cream ground, teal diagonal stripes, a coral shape, a navy dot.
fn brand(dir: &Path, count: usize, size: u32, seed: u64) -> Result<()> {
    let mut rng = SplitMix64::new(seed);
    for i in 0..count {
        let shape = SHAPES[i % SHAPES.len()];
        let phase = uniform(&mut rng, 0.0, 1.0);
        let stripes: Layer = Box::new(move |u, v| {
            let t = ((u + v) * 2.5 + phase).fract();
            (t < 0.3).then_some(TEAL)
        });
        let r = uniform(&mut rng, 0.24, 0.32);
        let cx = uniform(&mut rng, 0.5 - (0.42 - r), 0.5 + (0.42 - r));
        let cy = uniform(&mut rng, 0.5 - (0.42 - r), 0.5 + (0.42 - r));
        let angle = uniform(&mut rng, -0.25, 0.25);
        // A cream halo keeps the shape readable against the stripes.
        let halo = shape_layer(shape, cx, cy, r * 1.18, angle, CREAM);
        let body = shape_layer(shape, cx, cy, r, angle, CORAL);
        let (dx, dy) = (uniform(&mut rng, 0.1, 0.9), if cy > 0.5 { 0.12 } else { 0.88 });
        let dot: Layer = Box::new(move |u, v| ((u - dx).powi(2) + (v - dy).powi(2) <= 0.07f64.powi(2)).then_some(NAVY));
        let image = draw(size, CREAM, &[stripes, halo, body, dot]);
        write(dir, &format!("tidewave-{i:02}"), &image, &format!("tidewave style, a {}", shape.name()))?;
    }
    println!("wrote {count} brand images to {}", dir.display());
    Ok(())
}

fn write(dir: &Path, stem: &str, image: &RgbImage, caption: &str) -> Result<()> {
    let png = dir.join(format!("{stem}.png"));
    image.save(&png).with_context(|| format!("cannot write {}", png.display()))?;
    std::fs::write(dir.join(format!("{stem}.txt")), format!("{caption}\n"))
        .with_context(|| format!("cannot write the caption of {}", png.display()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(kind), Some(dir)) = (args.first(), args.get(1)) else {
        bail!("usage: make_shapes base|brand|vae DIR [--count N] [--size PX] [--seed S]");
    };
    let (mut count, mut size, mut seed) = match kind.as_str() {
        "base" => (4000, 64, 1),
        "brand" => (24, 128, 7),
        "vae" => (4000, 64, 3),
        other => bail!("{other} is not base, brand or vae"),
    };
    let mut it = args[2..].iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--count" => count = value.parse()?,
            "--size" => size = value.parse()?,
            "--seed" => seed = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    match kind.as_str() {
        "base" => base(&dir, count, size, seed),
        "brand" => brand(&dir, count, size, seed),
        _ => vae(&dir, count, size, seed),
    }
}
