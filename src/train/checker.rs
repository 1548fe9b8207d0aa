//! The analytic adherence checker: reads colour, shape and position off an RGB image with
//! pixel statistics and geometry alone, independent of any model.
//!
//! 1. The background is the per-channel median of the border pixels.
//! 2. Pixels further than [`FG_THRESHOLD`] from it (Euclidean RGB, in [0, 1] units) form the
//!    candidate foreground; its largest 8-connected component is the shape (at least
//!    [`MIN_PIXELS`] pixels, else "no shape").
//! 3. The foreground colour is the mean of the component's core (pixels at least 75 % as far
//!    from the background as the furthest one); the named colour is the nearest palette entry.
//! 4. Each pixel near the component gets an opacity `alpha`: its colour projected onto the
//!    background -> foreground segment. The centroid of `alpha` gives the position (grid cell
//!    by the midpoints between the dataset's cell centres).
//! 5. The shape is the template (circle, square, triangle, cross, drawn by the same geometry
//!    as the dataset) with the best soft IoU against `alpha`, each template placed at the
//!    centroid and sized to the same area (with small searches over scale, sub-pixel shift
//!    and edge softness, a Gaussian blur of the template).
use super::dataset::{coverage, Shape, BACKGROUNDS, CELL_CENTRES, COLOURS, SHAPES};

/// Distance from the background (RGB in [0, 1]) above which a pixel is foreground.
pub const FG_THRESHOLD: f32 = 0.25;
/// Fewest pixels a shape may have.
pub const MIN_PIXELS: usize = 6;

/// Edge softness (Gaussian sigma, pixels) of the shape templates: a generated or decoded
/// shape is rarely as crisp as the rendered one.
pub const TEMPLATE_BLURS: [f32; 3] = [0.0, 0.7, 1.2];

/// Separable Gaussian blur of a `size` x `size` map (edges clamped); sigma 0 is a copy.
pub fn blur(map: &[f32], size: usize, sigma: f32) -> Vec<f32> {
    if sigma <= 0.0 {
        return map.to_vec();
    }
    let r = (3.0 * sigma).ceil() as i64;
    let kernel: Vec<f32> = (-r..=r)
        .map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let at = |v: i64| v.clamp(0, size as i64 - 1) as usize;
    let mut tmp = vec![0f32; map.len()];
    for y in 0..size {
        for x in 0..size {
            tmp[y * size + x] = (-r..=r)
                .map(|d| kernel[(d + r) as usize] * map[y * size + at(x as i64 + d)])
                .sum();
        }
    }
    let mut out = vec![0f32; map.len()];
    for y in 0..size {
        for x in 0..size {
            out[y * size + x] = (-r..=r)
                .map(|d| kernel[(d + r) as usize] * tmp[at(y as i64 + d) * size + x])
                .sum();
        }
    }
    out
}

/// What the checker read off an image.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Index into [`COLOURS`]; `None` when no shape was found.
    pub colour: Option<usize>,
    pub shape: Option<Shape>,
    /// (column, row) of the centroid's grid cell.
    pub cell: Option<(usize, usize)>,
    /// Index into [`BACKGROUNDS`] of the nearest background colour.
    pub background: usize,
    /// Foreground colour estimate, RGB in [0, 1].
    pub fg_rgb: [f32; 3],
    pub centroid: (f32, f32),
    /// Soft area in pixels.
    pub area: f32,
    /// Soft IoU of the best template.
    pub iou: f32,
}

/// What a prompt asked for; `None` fields are not judged.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Target {
    pub colour: Option<usize>,
    pub shape: Option<Shape>,
    pub cell: Option<(usize, usize)>,
}

/// Per-attribute verdicts of one image.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Verdict {
    pub colour: bool,
    pub shape: bool,
    pub position: bool,
}

impl Verdict {
    pub fn colour_and_shape(&self) -> bool {
        self.colour && self.shape
    }
}

impl Reading {
    pub fn judge(&self, target: &Target) -> Verdict {
        Verdict {
            colour: target.colour.is_some() && self.colour == target.colour,
            shape: target.shape.is_some() && self.shape == target.shape,
            position: target.cell.is_some() && self.cell == target.cell,
        }
    }
}

fn pixel(rgb: &[u8], i: usize) -> [f32; 3] {
    [
        rgb[3 * i] as f32 / 255.0,
        rgb[3 * i + 1] as f32 / 255.0,
        rgb[3 * i + 2] as f32 / 255.0,
    ]
}

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

fn nearest(colour: [f32; 3], palette: &[(&str, [u8; 3])]) -> usize {
    let mut best = (f32::INFINITY, 0);
    for (i, (_, p)) in palette.iter().enumerate() {
        let q = [
            p[0] as f32 / 255.0,
            p[1] as f32 / 255.0,
            p[2] as f32 / 255.0,
        ];
        let d = dist(colour, q);
        if d < best.0 {
            best = (d, i);
        }
    }
    best.1
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// The grid cell (0, 1, 2) of a coordinate along a side of `size` pixels: boundaries at the
/// midpoints between the dataset's cell centres.
pub fn cell_of(coord: f32, size: usize) -> usize {
    let s = size as f32;
    let b0 = (CELL_CENTRES[0] + CELL_CENTRES[1]) / 2.0 * s;
    let b1 = (CELL_CENTRES[1] + CELL_CENTRES[2]) / 2.0 * s;
    if coord < b0 {
        0
    } else if coord < b1 {
        1
    } else {
        2
    }
}

/// Reads a square `size` x `size` RGB image.
pub fn read(rgb: &[u8], size: usize) -> Reading {
    read_in(rgb, size, None)
}

/// As [`read`], looking for the shape only inside `region` = (x0, y0, x1, y1) (exclusive
/// ends); the background still comes from the whole image's border.
pub fn read_in(rgb: &[u8], size: usize, region: Option<(usize, usize, usize, usize)>) -> Reading {
    let n = size * size;
    assert_eq!(rgb.len(), 3 * n, "checker: image is not {size}x{size} RGB");
    // 1. Background.
    let mut border = [Vec::new(), Vec::new(), Vec::new()];
    for y in 0..size {
        for x in 0..size {
            if x == 0 || y == 0 || x + 1 == size || y + 1 == size {
                let p = pixel(rgb, y * size + x);
                for c in 0..3 {
                    border[c].push(p[c]);
                }
            }
        }
    }
    let bg = [
        median(border[0].clone()),
        median(border[1].clone()),
        median(border[2].clone()),
    ];
    let background = nearest(bg, &BACKGROUNDS);
    let (rx0, ry0, rx1, ry1) = region.unwrap_or((0, 0, size, size));
    let inside = |x: usize, y: usize| x >= rx0 && x < rx1 && y >= ry0 && y < ry1;

    // 2. Candidate foreground and its largest 8-connected component.
    let d: Vec<f32> = (0..n).map(|i| dist(pixel(rgb, i), bg)).collect();
    let fg: Vec<bool> = (0..n)
        .map(|i| d[i] > FG_THRESHOLD && inside(i % size, i / size))
        .collect();
    let mut label = vec![usize::MAX; n];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..n {
        if !fg[start] || label[start] != usize::MAX {
            continue;
        }
        let mut comp = vec![start];
        label[start] = start;
        let mut k = 0;
        while k < comp.len() {
            let i = comp[k];
            k += 1;
            let (x, y) = ((i % size) as i64, (i / size) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= size as i64 || ny >= size as i64 {
                        continue;
                    }
                    let j = ny as usize * size + nx as usize;
                    if fg[j] && label[j] == usize::MAX {
                        label[j] = start;
                        comp.push(j);
                    }
                }
            }
        }
        if comp.len() > best.len() {
            best = comp;
        }
    }
    let empty = Reading {
        colour: None,
        shape: None,
        cell: None,
        background,
        fg_rgb: bg,
        centroid: (f32::NAN, f32::NAN),
        area: 0.0,
        iou: 0.0,
    };
    if best.len() < MIN_PIXELS {
        return empty;
    }

    // 3. Foreground colour from the component's core.
    let dmax = best.iter().map(|&i| d[i]).fold(0f32, f32::max);
    let mut sum = [0f32; 3];
    let mut count = 0f32;
    for &i in &best {
        if d[i] >= 0.75 * dmax {
            let p = pixel(rgb, i);
            for c in 0..3 {
                sum[c] += p[c];
            }
            count += 1.0;
        }
    }
    let fg_rgb = [sum[0] / count, sum[1] / count, sum[2] / count];
    let colour = nearest(fg_rgb, &COLOURS);

    // 4. Opacity near the component, centroid.
    let axis = [fg_rgb[0] - bg[0], fg_rgb[1] - bg[1], fg_rgb[2] - bg[2]];
    let axis2 = (axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]).max(1e-6);
    let mut near = vec![false; n];
    for &i in &best {
        let (x, y) = ((i % size) as i64, (i / size) as i64);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (nx, ny) = (x + dx, y + dy);
                if nx >= 0 && ny >= 0 && nx < size as i64 && ny < size as i64 {
                    near[ny as usize * size + nx as usize] = true;
                }
            }
        }
    }
    let mut alpha = vec![0f32; n];
    let (mut area, mut mx, mut my) = (0f32, 0f32, 0f32);
    for i in 0..n {
        if !near[i] {
            continue;
        }
        let p = pixel(rgb, i);
        let proj = ((p[0] - bg[0]) * axis[0] + (p[1] - bg[1]) * axis[1] + (p[2] - bg[2]) * axis[2])
            / axis2;
        let a = proj.clamp(0.0, 1.0);
        alpha[i] = a;
        area += a;
        mx += a * ((i % size) as f32 + 0.5);
        my += a * ((i / size) as f32 + 0.5);
    }
    let (cx, cy) = (mx / area, my / area);
    let cell = Some((cell_of(cx, size), cell_of(cy, size)));

    // 5. Shape by template IoU; the templates' size, sub-pixel position and edge softness
    //    are searched over.
    let mut best_shape = (f32::NEG_INFINITY, Shape::Circle);
    for &shape in &SHAPES {
        let side0 = (area / shape.area_factor()).sqrt();
        for scale in [0.9f32, 1.0, 1.1] {
            for sy in [-0.5f32, 0.0, 0.5] {
                for sx in [-0.5f32, 0.0, 0.5] {
                    let sharp = coverage(shape, cx + sx, cy + sy, side0 * scale, size);
                    for sigma in TEMPLATE_BLURS {
                        let t = blur(&sharp, size, sigma);
                        let (mut inter, mut union) = (0f32, 0f32);
                        for i in 0..n {
                            inter += alpha[i].min(t[i]);
                            union += alpha[i].max(t[i]);
                        }
                        let iou = inter / union.max(1e-6);
                        if iou > best_shape.0 {
                            best_shape = (iou, shape);
                        }
                    }
                }
            }
        }
    }
    Reading {
        colour: Some(colour),
        shape: Some(best_shape.1),
        cell,
        background,
        fg_rgb,
        centroid: (cx, cy),
        area,
        iou: best_shape.0,
    }
}

/// Counts of verdicts over a set of images.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    pub n: usize,
    pub colour: usize,
    pub shape: usize,
    pub position: usize,
    pub colour_and_shape: usize,
    pub all: usize,
}

impl Tally {
    pub fn add(&mut self, v: &Verdict) {
        self.n += 1;
        self.colour += v.colour as usize;
        self.shape += v.shape as usize;
        self.position += v.position as usize;
        self.colour_and_shape += v.colour_and_shape() as usize;
        self.all += (v.colour_and_shape() && v.position) as usize;
    }

    pub fn pct(&self, k: usize) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            100.0 * k as f64 / self.n as f64
        }
    }

    /// "colour 97.2 %, shape 95.4 %, colour+shape 93.1 %, position 88.0 %, all 83.3 % (n=216)"
    pub fn summary(&self) -> String {
        format!(
            "colour {:.1} %, shape {:.1} %, colour+shape {:.1} %, position {:.1} %, all three {:.1} % (n={})",
            self.pct(self.colour),
            self.pct(self.shape),
            self.pct(self.colour_and_shape),
            self.pct(self.position),
            self.pct(self.all),
            self.n
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::dataset::{render, Rng, Spec, Split};

    #[test]
    fn reads_the_dataset_exactly() {
        let mut rng = Rng::new(7);
        let mut tally = Tally::default();
        for i in 0..400 {
            let split = if i % 2 == 0 {
                Split::Train
            } else {
                Split::HeldOut
            };
            let spec = Spec::sample(&mut rng, split, 32);
            let reading = read(&render(&spec), 32);
            let target = Target {
                colour: Some(spec.colour),
                shape: Some(spec.shape),
                cell: Some((spec.column(), spec.row())),
            };
            let v = reading.judge(&target);
            assert_eq!(reading.background, spec.background);
            tally.add(&v);
        }
        assert_eq!(tally.all, tally.n, "{}", tally.summary());
    }

    #[test]
    fn blank_image_has_no_shape() {
        let rgb = vec![255u8; 32 * 32 * 3];
        let r = read(&rgb, 32);
        assert_eq!(r.colour, None);
        assert_eq!(r.shape, None);
    }
}
