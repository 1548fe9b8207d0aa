//! The procedural captioned image set: one flat-coloured shape on a plain background, drawn
//! with 4x4 supersampling, and its caption. Everything is a deterministic function of a seed
//! (our own SplitMix64 generator, independent of libtorch's).
//!
//! A [`Spec`] fixes colour, shape, size class, grid position, background and the exact
//! (jittered) centre and side; [`render`] draws it and [`Spec::caption`] describes it. Four
//! colour x shape combinations ([`HELD_OUT`]) never appear in training; the evaluation asks
//! the model for them.
use tch::{Device, Kind, Tensor};

use crate::Result;

/// Colour names and their sRGB values.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [230, 25, 25]),
    ("green", [20, 180, 20]),
    ("blue", [30, 60, 230]),
    ("yellow", [250, 220, 0]),
    ("purple", [160, 0, 210]),
    ("cyan", [0, 210, 230]),
];

/// Background names and their sRGB values.
pub const BACKGROUNDS: [(&str, [u8; 3]); 3] = [
    ("white", [255, 255, 255]),
    ("black", [0, 0, 0]),
    ("gray", [128, 128, 128]),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Cross,
}

pub const SHAPES: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross];

/// Size classes and the range of the side (bounding-box side) in pixels of a 32x32 image.
pub const SIZES: [(&str, f32, f32); 2] = [("small", 9.0, 11.0), ("large", 14.0, 16.0)];

/// Grid positions (column, row) and their phrases.
pub const POSITIONS: [((usize, usize), &str); 9] = [
    ((0, 0), "in the top left"),
    ((1, 0), "at the top"),
    ((2, 0), "in the top right"),
    ((0, 1), "on the left"),
    ((1, 1), "in the center"),
    ((2, 1), "on the right"),
    ((0, 2), "in the bottom left"),
    ((1, 2), "at the bottom"),
    ((2, 2), "in the bottom right"),
];

/// Centre of grid cell 0, 1, 2 along a side, as a fraction of the side.
pub const CELL_CENTRES: [f32; 3] = [9.5 / 32.0, 0.5, 22.5 / 32.0];
/// Jitter of the centre, in pixels of a 32x32 image, each way.
pub const JITTER: f32 = 1.0;

/// (colour index, shape) pairs that no training stage ever sees.
pub const HELD_OUT: [(usize, Shape); 4] = [
    (0, Shape::Triangle), // red triangle
    (1, Shape::Cross),    // green cross
    (2, Shape::Circle),   // blue circle
    (3, Shape::Square),   // yellow square
];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Cross => "cross",
        }
    }

    pub fn index(self) -> usize {
        SHAPES.iter().position(|&s| s == self).unwrap_or(0)
    }

    /// Area as a fraction of side².
    pub fn area_factor(self) -> f32 {
        match self {
            Shape::Circle => std::f32::consts::FRAC_PI_4,
            Shape::Square => 1.0,
            Shape::Triangle => TRIANGLE_HEIGHT / 2.0,
            Shape::Cross => 1.0 - (1.0 - CROSS_ARM) * (1.0 - CROSS_ARM),
        }
    }

    /// Whether the point (dx, dy), relative to the shape's centroid, is inside a shape of
    /// bounding-box width `side`. Every shape has its centroid at the origin: the triangle
    /// (equilateral, apex up, base `side`) reaches 2/3 of its height above it and 1/3 below.
    pub fn contains(self, dx: f32, dy: f32, side: f32) -> bool {
        let h = side / 2.0;
        match self {
            Shape::Circle => dx * dx + dy * dy <= h * h,
            Shape::Square => dx.abs() <= h && dy.abs() <= h,
            Shape::Triangle => {
                let height = TRIANGLE_HEIGHT * side;
                let top = -2.0 * height / 3.0;
                let bottom = height / 3.0;
                if dy < top || dy > bottom {
                    return false;
                }
                dx.abs() <= h * (dy - top) / height
            }
            Shape::Cross => {
                let arm = CROSS_ARM * h;
                (dx.abs() <= arm && dy.abs() <= h) || (dy.abs() <= arm && dx.abs() <= h)
            }
        }
    }
}

/// Height of the (equilateral) triangle as a fraction of its base.
pub const TRIANGLE_HEIGHT: f32 = 0.866_025_4;

/// Half-thickness of the cross's arms as a fraction of its half-side.
pub const CROSS_ARM: f32 = 0.4;

pub fn is_held_out(colour: usize, shape: Shape) -> bool {
    HELD_OUT.contains(&(colour, shape))
}

/// SplitMix64: a small, fast, seedable generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// A generator for one (stream, index) pair of a seed, e.g. (stage, step).
    pub fn derive(seed: u64, stream: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.0 ^= r
            .next_u64()
            .wrapping_add(index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform integer in [0, n) (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }
}

/// Which colour x shape combinations a sample may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Everything but the held-out combinations.
    Train,
    /// Only the held-out combinations.
    HeldOut,
}

/// One image of the set.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub colour: usize,
    pub shape: Shape,
    pub size: usize,
    /// Grid cell (column, row), index into [`POSITIONS`].
    pub position: usize,
    pub background: usize,
    /// Centroid and side in pixels, for an image of `image_size` pixels.
    pub cx: f32,
    pub cy: f32,
    pub side: f32,
    pub image_size: usize,
}

/// Which parts a caption mentions (the colour and the shape are always there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaptionParts {
    pub size: bool,
    pub position: bool,
    pub background: bool,
}

impl CaptionParts {
    pub const FULL: CaptionParts = CaptionParts {
        size: true,
        position: true,
        background: true,
    };

    /// Every combination, the full caption first.
    pub fn all() -> Vec<CaptionParts> {
        let mut out = vec![Self::FULL];
        for bits in (0..7u8).rev() {
            out.push(CaptionParts {
                size: bits & 4 != 0,
                position: bits & 2 != 0,
                background: bits & 1 != 0,
            });
        }
        out
    }

    /// Training captions: each optional part is left out a quarter of the time, so that short
    /// prompts ("a red circle") work too.
    pub fn sample(rng: &mut Rng) -> CaptionParts {
        CaptionParts {
            size: rng.uniform() >= 0.25,
            position: rng.uniform() >= 0.25,
            background: rng.uniform() >= 0.25,
        }
    }
}

impl Spec {
    /// A spec with the canonical centre and middle side of its size class (no jitter).
    pub fn canonical(
        colour: usize,
        shape: Shape,
        size: usize,
        position: usize,
        background: usize,
        image_size: usize,
    ) -> Spec {
        let (col, row) = POSITIONS[position].0;
        let scale = image_size as f32;
        let (_, lo, hi) = SIZES[size];
        Spec {
            colour,
            shape,
            size,
            position,
            background,
            cx: CELL_CENTRES[col] * scale,
            cy: CELL_CENTRES[row] * scale,
            side: (lo + hi) / 2.0 * scale / 32.0,
            image_size,
        }
    }

    /// A random spec of `split`: colour, shape, size, position and background uniform (over
    /// the allowed combinations), centre jittered, side uniform in its size class.
    pub fn sample(rng: &mut Rng, split: Split, image_size: usize) -> Spec {
        let (colour, shape) = loop {
            let c = rng.below(COLOURS.len());
            let s = SHAPES[rng.below(SHAPES.len())];
            if is_held_out(c, s) == (split == Split::HeldOut) {
                break (c, s);
            }
        };
        let size = rng.below(SIZES.len());
        let position = rng.below(POSITIONS.len());
        let background = rng.below(BACKGROUNDS.len());
        Self::jittered(colour, shape, size, position, background, image_size, rng)
    }

    /// The canonical spec with its centre jittered and its side drawn from its size class.
    pub fn jittered(
        colour: usize,
        shape: Shape,
        size: usize,
        position: usize,
        background: usize,
        image_size: usize,
        rng: &mut Rng,
    ) -> Spec {
        let mut spec = Self::canonical(colour, shape, size, position, background, image_size);
        let scale = image_size as f32 / 32.0;
        let (_, lo, hi) = SIZES[size];
        spec.side = rng.range(lo, hi) * scale;
        spec.cx += rng.range(-JITTER, JITTER) * scale;
        spec.cy += rng.range(-JITTER, JITTER) * scale;
        spec
    }

    pub fn caption(&self) -> String {
        self.caption_with(CaptionParts::FULL)
    }

    /// "a small red circle in the top left on a white background", with the optional parts
    /// left out as `parts` says.
    pub fn caption_with(&self, parts: CaptionParts) -> String {
        let mut s = String::from("a ");
        if parts.size {
            s.push_str(SIZES[self.size].0);
            s.push(' ');
        }
        s.push_str(COLOURS[self.colour].0);
        s.push(' ');
        s.push_str(self.shape.name());
        if parts.position {
            s.push(' ');
            s.push_str(POSITIONS[self.position].1);
        }
        if parts.background {
            s.push_str(" on a ");
            s.push_str(BACKGROUNDS[self.background].0);
            s.push_str(" background");
        }
        s
    }

    pub fn column(&self) -> usize {
        POSITIONS[self.position].0 .0
    }

    pub fn row(&self) -> usize {
        POSITIONS[self.position].0 .1
    }
}

/// Samples per pixel side for anti-aliasing.
const SUPERSAMPLE: usize = 4;

/// Coverage in [0, 1] of each pixel by a shape with centroid (cx, cy) and side `side`, on a
/// `size` x `size` grid, row-major.
pub fn coverage(shape: Shape, cx: f32, cy: f32, side: f32, size: usize) -> Vec<f32> {
    let mut out = vec![0f32; size * size];
    let reach = side; // every shape lies within `side` of its centroid
    let x0 = ((cx - reach).floor().max(0.0)) as usize;
    let y0 = ((cy - reach).floor().max(0.0)) as usize;
    let x1 = ((cx + reach).ceil().max(0.0) as usize).min(size);
    let y1 = ((cy + reach).ceil().max(0.0) as usize).min(size);
    let n = SUPERSAMPLE as f32;
    for y in y0..y1 {
        for x in x0..x1 {
            let mut hits = 0;
            for sy in 0..SUPERSAMPLE {
                for sx in 0..SUPERSAMPLE {
                    let px = x as f32 + (sx as f32 + 0.5) / n;
                    let py = y as f32 + (sy as f32 + 0.5) / n;
                    if shape.contains(px - cx, py - cy, side) {
                        hits += 1;
                    }
                }
            }
            out[y * size + x] = hits as f32 / (n * n);
        }
    }
    out
}

/// The image of a spec as 8-bit RGB, row-major.
pub fn render(spec: &Spec) -> Vec<u8> {
    let size = spec.image_size;
    let cov = coverage(spec.shape, spec.cx, spec.cy, spec.side, size);
    let fg = COLOURS[spec.colour].1;
    let bg = BACKGROUNDS[spec.background].1;
    let mut rgb = Vec::with_capacity(size * size * 3);
    for a in cov {
        for c in 0..3 {
            let v = bg[c] as f32 * (1.0 - a) + fg[c] as f32 * a;
            rgb.push(v.round().clamp(0.0, 255.0) as u8);
        }
    }
    rgb
}

/// A plain background image (for inpainting).
pub fn render_background(background: usize, size: usize) -> Vec<u8> {
    BACKGROUNDS[background]
        .1
        .iter()
        .copied()
        .cycle()
        .take(size * size * 3)
        .collect()
}

/// 8-bit RGB images (all `size` x `size`) to a `[n, 3, size, size]` float tensor in [-1, 1].
pub fn to_tensor(images: &[Vec<u8>], size: usize) -> Result<Tensor> {
    let flat: Vec<u8> = images.iter().flatten().copied().collect();
    let n = images.len() as i64;
    let s = size as i64;
    Ok(Tensor::f_from_slice(&flat)?
        .f_view([n, s, s, 3])?
        .f_permute([0, 3, 1, 2])?
        .f_to_kind(Kind::Float)?
        .f_div_scalar(127.5)?
        .f_sub_scalar(1.0)?
        .f_contiguous()?
        .f_to_device(Device::Cpu)?)
}

/// `n` random specs of `split` and their images as a tensor in [-1, 1].
pub fn batch(rng: &mut Rng, split: Split, n: usize, size: usize) -> Result<(Vec<Spec>, Tensor)> {
    let specs: Vec<Spec> = (0..n).map(|_| Spec::sample(rng, split, size)).collect();
    let images: Vec<Vec<u8>> = specs.iter().map(render).collect();
    Ok((specs, to_tensor(&images, size)?))
}

/// Every caption the training stages may show, for every allowed combination and every
/// choice of optional parts, sorted and deduplicated; with `held_out`, the held-out
/// combinations' captions too.
pub fn all_captions(held_out: bool) -> Vec<String> {
    let mut out = Vec::new();
    for colour in 0..COLOURS.len() {
        for &shape in &SHAPES {
            if is_held_out(colour, shape) && !held_out {
                continue;
            }
            for size in 0..SIZES.len() {
                for position in 0..POSITIONS.len() {
                    for background in 0..BACKGROUNDS.len() {
                        let spec = Spec::canonical(colour, shape, size, position, background, 32);
                        for parts in CaptionParts::all() {
                            out.push(spec.caption_with(parts));
                        }
                    }
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Every word any caption uses.
pub fn vocabulary_words() -> Vec<String> {
    let mut words: Vec<String> = all_captions(true)
        .iter()
        .flat_map(|c| c.split(' ').map(String::from).collect::<Vec<_>>())
        .collect();
    words.sort();
    words.dedup();
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_and_split() {
        let spec = Spec::canonical(0, Shape::Circle, 0, 0, 0, 32);
        assert_eq!(
            spec.caption(),
            "a small red circle in the top left on a white background"
        );
        let mut rng = Rng::new(1);
        for _ in 0..200 {
            let s = Spec::sample(&mut rng, Split::Train, 32);
            assert!(!is_held_out(s.colour, s.shape));
            let h = Spec::sample(&mut rng, Split::HeldOut, 32);
            assert!(is_held_out(h.colour, h.shape));
        }
    }

    #[test]
    fn areas_match_factors() {
        for shape in SHAPES {
            let cov = coverage(shape, 16.0, 16.0, 14.0, 32);
            let area: f32 = cov.iter().sum();
            let expected = shape.area_factor() * 14.0 * 14.0;
            assert!(
                (area - expected).abs() < 0.03 * expected,
                "{shape:?} {area} {expected}"
            );
        }
    }
}
