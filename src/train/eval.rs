//! Prompt adherence of a model folder, judged by the analytic [`checker`](super::checker):
//! - text to image on the held-out colour x shape combinations (every size, position and
//!   background), with classifier-free guidance;
//! - the same targets from the empty prompt (the chance baseline);
//! - text to image on training combinations (for comparison);
//! - img2img: recolour a data set image (strength ~0.7), the shape and place must stay;
//! - inpainting: paint a prompted shape into a square mask on a plain background.
use super::checker::{self, Tally, Target};
use super::dataset::{
    self, is_held_out, Rng, Spec, Split, BACKGROUNDS, COLOURS, HELD_OUT, POSITIONS, SIZES,
};
use super::streams;
use crate::image_io::Image;
use crate::pipeline::{FastModes, GenerateParams, StableDiffusion};
use crate::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub guidance: f64,
    pub steps: usize,
    pub seed: u64,
    /// Held-out prompts (and as many empty-prompt images); 216 covers every held-out
    /// combination, size, position and background once.
    pub images: usize,
    /// Images of each of the other parts (training combinations, img2img, inpainting).
    pub other_images: usize,
    pub img2img_strength: f64,
    /// Writes a contact sheet of the first held-out generations here.
    pub sheet: Option<PathBuf>,
    pub progress: bool,
    /// Fast modes every generation runs with, to measure what they cost in adherence.
    pub fast: FastModes,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            guidance: 5.0,
            steps: 20,
            seed: 1000,
            images: 216,
            other_images: 108,
            img2img_strength: 0.7,
            sheet: None,
            progress: false,
            fast: FastModes::default(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EvalReport {
    pub held_out: Tally,
    pub empty_prompt: Tally,
    pub train_combos: Tally,
    pub img2img: Tally,
    pub inpaint: Tally,
    /// Held-out txt2img: rows = asked shape, columns = shape read (last column: none found).
    pub shape_confusion: [[usize; 5]; 4],
    /// Held-out txt2img: colour+shape correct per asked size (small, large).
    pub by_size: [(usize, usize); 2],
    pub seconds: f64,
}

impl EvalReport {
    pub fn print(&self, o: &EvalOptions) {
        println!(
            "prompt adherence (analytic checker), DDIM {} steps, guidance {}:",
            o.steps, o.guidance
        );
        println!("  held-out combinations   : {}", self.held_out.summary());
        println!(
            "  empty prompt (chance)   : {}",
            self.empty_prompt.summary()
        );
        println!(
            "  training combinations   : {}",
            self.train_combos.summary()
        );
        println!(
            "  img2img recolour (s={})  : {}",
            o.img2img_strength,
            self.img2img.summary()
        );
        println!("  inpaint into a mask     : {}", self.inpaint.summary());
        println!(
            "  held-out shape confusion (rows: asked; columns: circle square triangle cross none):"
        );
        for (i, row) in self.shape_confusion.iter().enumerate() {
            println!("    {:9} {:?}", dataset::SHAPES[i].name(), row);
        }
        for (i, (ok, n)) in self.by_size.iter().enumerate() {
            println!("  held-out colour+shape, {} shapes: {ok}/{n}", SIZES[i].0);
        }
        println!("  ({:.0} s)", self.seconds);
    }
}

/// The held-out prompts' specs: every held-out combination x size x position x background,
/// spread evenly when fewer are asked for, repeated when more.
pub fn held_out_specs(n: usize, size: usize) -> Vec<Spec> {
    let mut all = Vec::new();
    for &(colour, shape) in &HELD_OUT {
        for s in 0..SIZES.len() {
            for p in 0..POSITIONS.len() {
                for b in 0..BACKGROUNDS.len() {
                    all.push(Spec::canonical(colour, shape, s, p, b, size));
                }
            }
        }
    }
    // Interleave so that any prefix mixes combinations, positions and backgrounds.
    let m = all.len();
    let stride = 97; // coprime with 216
    (0..n).map(|i| all[(i * stride) % m].clone()).collect()
}

fn target_of(spec: &Spec) -> Target {
    Target {
        colour: Some(spec.colour),
        shape: Some(spec.shape),
        cell: Some((spec.column(), spec.row())),
    }
}

fn bar(total: usize, label: &str, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// One generated image as 8-bit RGB.
fn generate_one(sd: &StableDiffusion, params: &GenerateParams) -> Result<Vec<u8>> {
    let images = sd.generate(params, None)?;
    Ok(images.to_rgb8()?.swap_remove(0))
}

/// Runs the whole evaluation.
pub fn evaluate(sd: &StableDiffusion, o: &EvalOptions) -> Result<EvalReport> {
    let t0 = Instant::now();
    let size = sd.default_size() as usize;
    let base = GenerateParams {
        steps: o.steps,
        guidance: o.guidance,
        fast: o.fast,
        ..Default::default()
    };
    let mut report = EvalReport::default();
    let mut sheet = Vec::new();

    // Held-out prompts, and the empty prompt judged against the same targets.
    let specs = held_out_specs(o.images, size);
    let b = bar(2 * specs.len(), "txt2img", o.progress);
    for (i, spec) in specs.iter().enumerate() {
        let seed = o.seed + i as u64;
        let rgb = generate_one(
            sd,
            &GenerateParams {
                prompt: spec.caption(),
                seed,
                ..base.clone()
            },
        )?;
        let reading = checker::read(&rgb, size);
        let verdict = reading.judge(&target_of(spec));
        report.held_out.add(&verdict);
        let col = reading.shape.map(|s| s.index()).unwrap_or(4);
        report.shape_confusion[spec.shape.index()][col] += 1;
        report.by_size[spec.size].0 += verdict.colour_and_shape() as usize;
        report.by_size[spec.size].1 += 1;
        if sheet.len() < 48 {
            sheet.push(rgb);
        }
        let rgb = generate_one(
            sd,
            &GenerateParams {
                prompt: String::new(),
                seed,
                ..base.clone()
            },
        )?;
        report
            .empty_prompt
            .add(&checker::read(&rgb, size).judge(&target_of(spec)));
        b.inc(2);
        b.set_message(format!(
            "held-out c+s {:.0} %",
            report.held_out.pct(report.held_out.colour_and_shape)
        ));
    }
    b.finish_and_clear();

    // Training combinations (fresh jitter, sizes, positions, backgrounds).
    let mut rng = Rng::derive(o.seed, streams::EVAL, 10);
    let b = bar(o.other_images, "train", o.progress);
    for i in 0..o.other_images {
        let spec = Spec::sample(&mut rng, Split::Train, size);
        let rgb = generate_one(
            sd,
            &GenerateParams {
                prompt: spec.caption(),
                seed: o.seed + 10_000 + i as u64,
                ..base.clone()
            },
        )?;
        report
            .train_combos
            .add(&checker::read(&rgb, size).judge(&target_of(&spec)));
        b.inc(1);
    }
    b.finish_and_clear();

    // img2img: recolour a rendered shape.
    let mut rng = Rng::derive(o.seed, streams::EVAL, 11);
    let b = bar(o.other_images, "img2img", o.progress);
    for i in 0..o.other_images {
        let source = Spec::sample(&mut rng, Split::Train, size);
        let mut target = source.clone();
        while target.colour == source.colour {
            target.colour = rng.below(COLOURS.len());
        }
        let init = Image::new(size as u32, size as u32, dataset::render(&source))?;
        let rgb = generate_one(
            sd,
            &GenerateParams {
                prompt: target.caption(),
                seed: o.seed + 20_000 + i as u64,
                init_image: Some(init),
                strength: Some(o.img2img_strength),
                ..base.clone()
            },
        )?;
        report
            .img2img
            .add(&checker::read(&rgb, size).judge(&target_of(&target)));
        b.inc(1);
    }
    b.finish_and_clear();

    // Inpainting: a prompted shape into a square mask around its cell, on a plain background.
    let mut rng = Rng::derive(o.seed, streams::EVAL, 12);
    let b = bar(o.other_images, "inpaint", o.progress);
    for i in 0..o.other_images {
        let split = if i % 2 == 0 {
            Split::Train
        } else {
            Split::HeldOut
        };
        let spec = Spec::sample(&mut rng, split, size);
        let half = size / 4;
        let (cx, cy) = (
            (dataset::CELL_CENTRES[spec.column()] * size as f32) as usize,
            (dataset::CELL_CENTRES[spec.row()] * size as f32) as usize,
        );
        let x0 = cx.saturating_sub(half);
        let y0 = cy.saturating_sub(half);
        let (x1, y1) = ((x0 + 2 * half).min(size), (y0 + 2 * half).min(size));
        let mut mask = vec![0u8; size * size * 3];
        for y in y0..y1 {
            for x in x0..x1 {
                mask[3 * (y * size + x)..3 * (y * size + x) + 3].fill(255);
            }
        }
        let init = Image::new(
            size as u32,
            size as u32,
            dataset::render_background(spec.background, size),
        )?;
        let rgb = generate_one(
            sd,
            &GenerateParams {
                prompt: spec.caption(),
                seed: o.seed + 30_000 + i as u64,
                init_image: Some(init),
                mask: Some(Image::new(size as u32, size as u32, mask)?),
                strength: Some(1.0),
                paste_back: true,
                ..base.clone()
            },
        )?;
        let reading = checker::read_in(&rgb, size, Some((x0, y0, x1, y1)));
        report.inpaint.add(&reading.judge(&target_of(&spec)));
        b.inc(1);
    }
    b.finish_and_clear();

    if let Some(path) = &o.sheet {
        write_sheet(path, &sheet, size, 12, 2)?;
    }
    report.seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// A grid of images, `cols` per row, each enlarged `zoom` times (nearest), 2-pixel grey
/// gutters.
pub fn write_sheet(
    path: &std::path::Path,
    images: &[Vec<u8>],
    size: usize,
    cols: usize,
    zoom: usize,
) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    let rows = images.len().div_ceil(cols);
    let gap = 2;
    let cell = size * zoom;
    let w = cols * (cell + gap) + gap;
    let h = rows * (cell + gap) + gap;
    let mut out = vec![96u8; w * h * 3];
    for (k, img) in images.iter().enumerate() {
        let (ox, oy) = (
            gap + (k % cols) * (cell + gap),
            gap + (k / cols) * (cell + gap),
        );
        for y in 0..cell {
            for x in 0..cell {
                let src = 3 * ((y / zoom) * size + x / zoom);
                let at = 3 * ((oy + y) * w + ox + x);
                out[at..at + 3].copy_from_slice(&img[src..src + 3]);
            }
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    }
    crate::image_io::save_png(path, &out, w as u32, h as u32, &[])
}

/// Quick adherence check: `n` held-out prompts at `steps` steps; returns (colour+shape
/// correct, n).
pub fn smoke(
    sd: &StableDiffusion,
    n: usize,
    steps: usize,
    guidance: f64,
) -> Result<(usize, usize)> {
    let size = sd.default_size() as usize;
    let mut ok = 0;
    for (i, spec) in held_out_specs(n, size).iter().enumerate() {
        let rgb = generate_one(
            sd,
            &GenerateParams {
                prompt: spec.caption(),
                steps,
                guidance,
                seed: 7 + i as u64,
                ..Default::default()
            },
        )?;
        ok += checker::read(&rgb, size)
            .judge(&target_of(spec))
            .colour_and_shape() as usize;
    }
    Ok((ok, n))
}

/// Whether a spec's combination is held out (re-exported for callers).
pub fn held_out(spec: &Spec) -> bool {
    is_held_out(spec.colour, spec.shape)
}
