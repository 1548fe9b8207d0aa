//! What engines need from the pipeline: seamless tiling, VAE tiling and the tiny autoencoder,
//! against diffusers' references from `tools/fixtures/engine.py`, and the seam of a tiled
//! texture measured on the tiny fixtures and on our own model.
mod common;

use common::{assert_close, case_params, fixtures, load_model, Refs};
use stable_diffusion::models::tiny_vae::TinyVaeLayout;
use stable_diffusion::pipeline::{
    load_vae, vae_decode_with, vae_encode_with, Control, GenerateParams, LoadOptions, Seamless,
    StableDiffusion, StepInfo, VaeTiling,
};
use stable_diffusion::Error;
use tch::{Kind, Tensor};

const SET: &str = "engine";

fn cases(group: &str) -> Vec<serde_json::Value> {
    common::cases(SET)[group].as_array().unwrap().clone()
}

fn no_stop() -> stable_diffusion::Result<()> {
    Ok(())
}

fn with_tiny(model: &str, tiny: &str) -> StableDiffusion {
    let options = LoadOptions {
        tiny_vae: Some(fixtures().join(tiny)),
        ..Default::default()
    };
    StableDiffusion::load(&fixtures().join(model), &options).unwrap_or_else(|e| panic!("{e}"))
}

/// diffusers with every convolution of the UNet and the VAE padded circularly along the
/// case's axes (`padding_mode="circular"` for both): the same image within 1e-3. Off, the same
/// call gives diffusers' plain image, bit for bit what it gave before a seamless call.
#[test]
fn seamless_images_equal_circular_padding_in_diffusers() {
    let refs = Refs::open(SET);
    for case in cases("seamless") {
        let name = case["name"].as_str().unwrap();
        let sd = load_model(case["model"].as_str().unwrap());
        let plain = case_params(&case);
        let before = sd.generate(&plain, None).unwrap().pixels;
        assert_close(
            &format!("{name} plain"),
            &before,
            &refs.get(&format!("plain_{name}")),
            1e-3,
        );
        let params = GenerateParams {
            seamless: Seamless::parse(case["axes"].as_str().unwrap()).unwrap(),
            ..plain.clone()
        };
        let wrapped = sd.generate(&params, None).unwrap().pixels;
        assert_close(name, &wrapped, &refs.get(&format!("seamless_{name}")), 1e-3);
        let after = sd.generate(&plain, None).unwrap().pixels;
        assert!(
            before.equal(&after),
            "{name}: a seamless call changed the next plain one"
        );
    }
}

/// Mean absolute difference between neighbouring columns of `[h, w, 3]` pixels: every interior
/// pair, and the pair across the wrap-around edge (last column, first column).
fn column_steps(pixels: &Tensor) -> (Vec<f64>, f64) {
    let w = pixels.size()[1];
    let col = |i: i64| pixels.select(1, i).to_kind(Kind::Double);
    let step = |a: i64, b: i64| (col(a) - col(b)).abs().mean(Kind::Double).double_value(&[]);
    let interior = (0..w - 1).map(|i| step(i, i + 1)).collect();
    (interior, step(w - 1, 0))
}

/// Along x and then y: the step across the wrap-around edge of a 2x2 tiling of `pixels`
/// `[h, w, 3]` and the steps between neighbouring interior columns (rows).
fn steps_both_axes(pixels: &Tensor) -> [(Vec<f64>, f64); 2] {
    [column_steps(pixels), column_steps(&pixels.transpose(0, 1))]
}

fn widest(steps: &[f64]) -> f64 {
    steps.iter().cloned().fold(0.0, f64::max)
}

/// Tiled 2x2, a seamless image shows no seam: the step across its wrap-around edge lies within
/// the spread of the steps between neighbouring interior columns (rows): below the largest on
/// every tiny fixture case, and on our own model, averaged over 16 prompts and seeds, within
/// four standard deviations of their mean (its images are flat colour with a few sharp
/// shapes, so one image's wrap edge may fall on a shape's edge, as any interior column may).
/// The same requests without seamless tiling are printed beside.
#[test]
fn seamless_textures_tile_without_a_seam() {
    for case in cases("seamless") {
        let name = case["name"].as_str().unwrap();
        let sd = load_model(case["model"].as_str().unwrap());
        let axes = Seamless::parse(case["axes"].as_str().unwrap()).unwrap();
        let params = GenerateParams {
            seamless: axes,
            ..case_params(&case)
        };
        let image = sd.generate(&params, None).unwrap().pixels.get(0);
        for ((interior, wrap), (axis, on)) in steps_both_axes(&image)
            .into_iter()
            .zip([("x", axes.x), ("y", axes.y)])
        {
            let top = widest(&interior);
            eprintln!("{name} {axis}: wrap step {wrap:.4}, interior steps up to {top:.4}");
            assert!(!on || wrap <= top, "{name}: a seam along {axis}");
        }
    }
    let ours = StableDiffusion::load(
        &std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny"),
        &LoadOptions::default(),
    )
    .unwrap();
    for axes in [Seamless::XY, Seamless::OFF] {
        // Per axis: the wrap step and each interior step, summed over the images.
        let mut sums = [(vec![0.0; 63], 0.0), (vec![0.0; 63], 0.0)];
        let mut count = 0.0;
        for prompt in [
            "a red circle on a blue background",
            "green stripes on yellow",
            "a white square on black",
            "orange and purple checkerboard",
        ] {
            for seed in 40..44 {
                let params = GenerateParams {
                    prompt: prompt.to_string(),
                    steps: 10,
                    width: Some(64),
                    height: Some(64),
                    seed,
                    seamless: axes,
                    ..Default::default()
                };
                let image = ours.generate(&params, None).unwrap().pixels.get(0);
                for (sum, (interior, wrap)) in sums.iter_mut().zip(steps_both_axes(&image)) {
                    sum.1 += wrap;
                    for (s, v) in sum.0.iter_mut().zip(interior) {
                        *s += v;
                    }
                }
                count += 1.0;
            }
        }
        for ((interior, wrap), axis) in sums.iter().zip(["x", "y"]) {
            let all: Vec<f64> = interior.iter().map(|v| v / count).collect();
            let mean = all.iter().sum::<f64>() / all.len() as f64;
            let sd =
                (all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / all.len() as f64).sqrt();
            let wrap = wrap / count;
            eprintln!(
                "models/tiny {} {axis}: mean wrap step {wrap:.4}; interior steps {mean:.4} \
                 +- {sd:.4}, up to {:.4}",
                axes.name(),
                widest(&all)
            );
            if axes == Seamless::XY {
                assert!(wrap <= mean + 4.0 * sd, "models/tiny: a seam along {axis}");
            }
            if axes == Seamless::OFF {
                eprintln!("(without wrapping the edges are independent: no bound is asserted)");
            }
        }
    }
}

/// What makes an image seamless: with the axes wrapping, the UNet and the VAE decoder commute
/// with rolls of their input along those axes (by a multiple of the UNet's downsampling), so no
/// column of the image is an edge. Off, they do not.
#[test]
fn wrapping_networks_commute_with_rolls() {
    use stable_diffusion::models::blocks::wrap_around;
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for path in [fixtures().join("tiny-sd1"), root.join("models/tiny")] {
        let sd = StableDiffusion::load(&path, &LoadOptions::default()).unwrap();
        let _no_grad = tch::no_grad_guard();
        let z = common::locked_randn(&[1, 4, 24, 32]);
        let context = sd.encode_prompt("a tileable brick wall", 1, 0).unwrap();
        let scale = sd.vae_scale_factor();
        for axes in [
            Seamless::XY,
            Seamless { x: true, y: false },
            Seamless { x: false, y: true },
            Seamless::OFF,
        ] {
            let _wrap = wrap_around(axes);
            for (dim, on) in [(3, axes.x), (2, axes.y)] {
                let unet_rolled = sd
                    .unet
                    .forward(&z.roll([8], [dim]), 601.0, &context)
                    .unwrap();
                let rolled_unet = sd
                    .unet
                    .forward(&z, 601.0, &context)
                    .unwrap()
                    .roll([8], [dim]);
                let unet = common::max_abs_diff(&unet_rolled, &rolled_unet);
                let vae_rolled = sd.vae.decode(&z.roll([8], [dim])).unwrap();
                let rolled_vae = sd.vae.decode(&z).unwrap().roll([8 * scale], [dim]);
                let vae = common::max_abs_diff(&vae_rolled, &rolled_vae);
                let what = format!("{} {} dim {dim}", path.display(), axes.name());
                eprintln!("{what}: UNet {unet:.2e}, VAE {vae:.2e}");
                if on {
                    assert!(unet < 1e-4 && vae < 1e-4, "{what}");
                } else {
                    assert!(
                        unet > 1e-3 && vae > 1e-3,
                        "{what}: commutes without wrapping"
                    );
                }
            }
        }
    }
}

/// diffusers' tiled AutoencoderKL (`enable_tiling` with the case's tile size): decodes and
/// encodes within 1e-4, odd sizes with edge tiles smaller than the blend, a batch of two,
/// and a tile larger than the image (not tiled, so equal to the plain decode).
#[test]
fn vae_tiles_equal_diffusers_tiled_vae() {
    let refs = Refs::open(SET);
    for case in cases("vae_tiling") {
        let name = case["name"].as_str().unwrap();
        let sd = load_model(case["model"].as_str().unwrap());
        let params = GenerateParams {
            vae_tiling: VaeTiling::On,
            vae_tile_size: case["tile_size"].as_i64(),
            ..Default::default()
        };
        let input = refs.get(&format!("in_{name}"));
        let _no_grad = tch::no_grad_guard();
        let out = match case["op"].as_str().unwrap() {
            "decode" => sd.vae_decode(&input, &params, &no_stop).unwrap(),
            _ => {
                let d = sd.encode_image(&input, &params, &no_stop).unwrap();
                Tensor::cat(&[d.mean, d.logvar], 1)
            }
        };
        let reference = refs.get(&format!("out_{name}"));
        assert_close(name, &out, &reference, 1e-4);
        // The same through the VAE loaded alone, as a caller without a pipeline uses it.
        let model = fixtures().join(case["model"].as_str().unwrap());
        if model.join("vae").is_dir() {
            let vae = load_vae(&model.join("vae"), &LoadOptions::default()).unwrap();
            let alone = match case["op"].as_str().unwrap() {
                "decode" => vae_decode_with(&vae, &input, &params, &no_stop).unwrap(),
                _ => {
                    let d = vae_encode_with(&vae, &input, &params, &no_stop).unwrap();
                    Tensor::cat(&[d.mean, d.logvar], 1)
                }
            };
            assert_close(&format!("{name} (VAE alone)"), &alone, &reference, 1e-4);
        }
        if case["tiled"].as_bool() == Some(true) {
            let plain = refs.get(&format!("plain_{name}"));
            assert!(
                common::max_abs_diff(&out, &plain) > 1e-2,
                "{name}: tiling changed nothing"
            );
        }
    }
}

/// txt2img with the VAE in tiles equals diffusers' pipeline with `vae.enable_tiling()`.
#[test]
fn tiled_decode_in_the_pipeline_equals_diffusers() {
    let refs = Refs::open(SET);
    for case in cases("vae_tiling_pipeline") {
        let name = case["name"].as_str().unwrap();
        let sd = load_model(case["model"].as_str().unwrap());
        let params = GenerateParams {
            vae_tiling: VaeTiling::On,
            vae_tile_size: case["tile_size"].as_i64(),
            ..case_params(&case)
        };
        let images = sd.generate(&params, None).unwrap().pixels;
        assert_close(name, &images, &refs.get(&format!("tiledpipe_{name}")), 1e-3);
    }
}

/// diffusers' AutoencoderTiny on the random TAESD / TAESDXL folders: decode and encode within
/// 1e-4; the same weights as original-layout encoder and decoder files and as one diffusers
/// `.safetensors` file give the same results.
#[test]
fn tiny_autoencoder_equals_diffusers() {
    let refs = Refs::open(SET);
    let options = LoadOptions::default();
    for case in cases("taesd") {
        let name = case["name"].as_str().unwrap();
        let folder = case["folder"].as_str().unwrap();
        let mut sources = vec![fixtures().join(folder)];
        sources.push(
            fixtures()
                .join(folder)
                .join("diffusion_pytorch_model.safetensors"),
        );
        let decode = case["op"] == "decode";
        if folder == "tiny-taesd" {
            let file = if decode {
                "taesd_decoder"
            } else {
                "taesd_encoder"
            };
            sources.push(
                fixtures()
                    .join("tiny-taesd-single")
                    .join(format!("{file}.safetensors")),
            );
        }
        let input = refs.get(&format!("in_{name}"));
        for source in sources {
            let tiny = stable_diffusion::pipeline::load_tiny_vae(&source, &options)
                .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
            let _no_grad = tch::no_grad_guard();
            let out = if decode {
                tiny.decode(&input).unwrap()
            } else {
                tiny.encode(&input).unwrap()
            };
            let what = format!("{name} from {}", source.display());
            assert_close(&what, &out, &refs.get(&format!("out_{name}")), 1e-4);
        }
    }
    assert_eq!(
        TinyVaeLayout::OriginalDecoder.key_of("decoder.layers.3.conv.0.weight"),
        "4.conv.0.weight"
    );
}

/// txt2img decoded by the tiny autoencoder equals diffusers' pipeline built with it as its
/// VAE; the final latents decoded alone agree within 1e-4. Previews come from it at full size.
#[test]
fn tiny_autoencoder_decodes_and_previews_in_the_pipeline() {
    let refs = Refs::open(SET);
    for case in cases("taesd_pipeline") {
        let name = case["name"].as_str().unwrap();
        let sd = with_tiny(
            case["model"].as_str().unwrap(),
            case["vae_folder"].as_str().unwrap(),
        );
        let params = GenerateParams {
            tiny_vae_decode: true,
            ..case_params(&case)
        };
        let latents = refs.get(&format!("latents_{name}"));
        let decoded = sd.decode_latents_for(&latents, &params, &|| false).unwrap();
        let expected = refs.get(&format!("taesdpipe_{name}"));
        assert_close(&format!("{name} latents"), &decoded.pixels, &expected, 1e-4);
        let mut previews = Vec::new();
        let mut on_step = |info: &StepInfo| {
            previews.push(info.previews().unwrap());
            Control::Continue
        };
        let images = sd.generate(&params, Some(&mut on_step)).unwrap().pixels;
        assert_close(name, &images, &expected, 1e-3);
        let (w, h) = (
            case["width"].as_u64().unwrap(),
            case["height"].as_u64().unwrap(),
        );
        let last = previews.last().unwrap();
        assert_eq!(
            (last[0].width as u64, last[0].height as u64),
            (w, h),
            "{name}: preview size"
        );
        // The last step's preview is the final image, in 8 bits.
        let final_rgb: Vec<u8> = Vec::try_from(
            (images.get(0) * 255.0)
                .round()
                .clamp(0.0, 255.0)
                .to_kind(Kind::Uint8)
                .reshape([-1]),
        )
        .unwrap();
        assert_eq!(last[0].rgb, final_rgb, "{name}: the last preview");
    }
    // Without a tiny autoencoder, previews are the latent-size map.
    let sd = load_model("tiny-sd1");
    let mut sizes = Vec::new();
    let mut on_step = |info: &StepInfo| {
        let p = info.previews().unwrap();
        sizes.push((p[0].width, p[0].height));
        Control::Continue
    };
    let params = GenerateParams {
        prompt: "a cat".into(),
        steps: 2,
        width: Some(32),
        height: Some(48),
        ..Default::default()
    };
    sd.generate(&params, Some(&mut on_step)).unwrap();
    assert_eq!(sizes, vec![(16, 24), (16, 24)]);
}

/// Combinations that cannot work are refused before a run, naming what is wrong: seamless with
/// VAE tiling forced on, tile sizes off the grid or below the least, the tiny decode without
/// a tiny autoencoder, and a tiny autoencoder whose latents are not the model's.
#[test]
fn engine_options_that_cannot_work_are_refused() {
    let sd = load_model("tiny-sd1");
    let base = GenerateParams {
        prompt: "a cat".into(),
        steps: 1,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    };
    let refused = |p: GenerateParams, says: &[&str]| {
        let e = sd.validate(&p).err().expect("refused").to_string();
        common::contains_all(&e, says);
    };
    refused(
        GenerateParams {
            seamless: Seamless::XY,
            vae_tiling: VaeTiling::On,
            ..base.clone()
        },
        &["seamless", "VAE tiling"],
    );
    for bad in [0, 8, 12, 20, 36, 4100, -16] {
        refused(
            GenerateParams {
                vae_tile_size: Some(bad),
                ..base.clone()
            },
            &["vae_tile_size", &bad.to_string()],
        );
    }
    refused(
        GenerateParams {
            tiny_vae_decode: true,
            ..base.clone()
        },
        &["tiny", "none was loaded"],
    );
    // Seamless with VAE tiling on auto never tiles, however large.
    assert!(sd
        .validate(&GenerateParams {
            seamless: Seamless::XY,
            vae_tile_size: Some(16),
            ..base.clone()
        })
        .is_ok());
    // models/tiny's latents are 4 channels at 1/2, as the fixture's; an SD 1.5-shaped TAESD
    // config at 1/8 is refused.
    let mut sd = load_model("tiny-sd1");
    let eight = stable_diffusion::models::TinyVaeConfig {
        encoder_block_out_channels: vec![8; 4],
        decoder_block_out_channels: vec![8; 4],
        ..Default::default()
    };
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let parts = stable_diffusion::models::tiny_vae::TinyVaeParts {
        encoder: true,
        decoder: true,
    };
    let tiny = stable_diffusion::models::AutoencoderTiny::new(vs.root(), &eight, parts).unwrap();
    let e = sd.set_tiny_vae(Some(tiny)).err().unwrap().to_string();
    common::contains_all(&e, &["tiny autoencoder", "1/8", "1/2"]);
    assert!(matches!(
        sd.validate(&GenerateParams {
            tiny_vae_decode: true,
            ..base
        }),
        Err(Error::InvalidArgument(_))
    ));
    // The VAE alone: a missing folder, a dtype no model loads in, bad tiles and latents.
    let missing = fixtures().join("tiny-sd1").join("no-vae-here");
    let e = load_vae(&missing, &LoadOptions::default()).err().unwrap();
    common::contains_all(&e.to_string(), &["no-vae-here"]);
    let ints = LoadOptions {
        kind: Kind::Int,
        ..Default::default()
    };
    let vae_dir = fixtures().join("tiny-sd1").join("vae");
    let e = load_vae(&vae_dir, &ints).err().unwrap();
    common::contains_all(&e.to_string(), &["dtype", "Int"]);
    let vae = load_vae(&vae_dir, &LoadOptions::default()).unwrap();
    let z = Tensor::zeros([1, 4, 16, 16], (Kind::Float, tch::Device::Cpu));
    let tiled = GenerateParams {
        vae_tiling: VaeTiling::On,
        vae_tile_size: Some(12),
        ..Default::default()
    };
    let e = vae_decode_with(&vae, &z, &tiled, &no_stop).err().unwrap();
    common::contains_all(&e.to_string(), &["vae_tile_size", "12"]);
    let flat = Tensor::zeros([4, 16, 16], (Kind::Float, tch::Device::Cpu));
    let e = vae_decode_with(&vae, &flat, &tiled, &no_stop)
        .err()
        .unwrap();
    common::contains_all(&e.to_string(), &["latents", "[4, 16, 16]"]);
    let e = vae_encode_with(&vae, &flat, &tiled, &no_stop)
        .err()
        .unwrap();
    common::contains_all(&e.to_string(), &["images", "[4, 16, 16]"]);
}

/// Hostile tiny-autoencoder files (a seeded loop over mutations of the fixture: tensors
/// reshaped, dropped, renamed or of another dtype, values not finite, bytes flipped or cut):
/// loading never panics, stays bounded in time, leaves the file as it was, and every error
/// names the file or the tensor; what loads decodes.
#[test]
fn hostile_tiny_autoencoder_files_are_refused_never_crash() {
    use common::{parse_safetensors, write_safetensors, Pick, Rng};
    use std::time::{Duration, Instant};
    let cases: usize = std::env::var("SD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let single = fixtures().join("tiny-taesd-single");
    let bases: Vec<_> = ["taesd_decoder.safetensors", "taesd_encoder.safetensors"]
        .iter()
        .map(|f| parse_safetensors(&std::fs::read(single.join(f)).unwrap()))
        .chain(std::iter::once(parse_safetensors(
            &std::fs::read(fixtures().join("tiny-taesd/diffusion_pytorch_model.safetensors"))
                .unwrap(),
        )))
        .collect();
    let dir = std::env::temp_dir().join(format!("sd-taesd-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("taesd.safetensors");
    let mut rng = Rng::new(0x7ae5d);
    let (mut loaded, mut failures) = (0, Vec::new());
    for case in 0..cases {
        let mut tensors = rng.pick(&bases).clone();
        let i = rng.below(tensors.len());
        let how = {
            let (name, dtype, shape, bytes) = &mut tensors[i];
            match rng.below(7) {
                0 => {
                    shape.reverse();
                    format!("{name} reversed")
                }
                1 => {
                    shape[0] = 1 << 40;
                    format!("{name} 2^40 rows")
                }
                2 => {
                    let n = name.clone();
                    tensors.remove(i);
                    format!("{n} dropped")
                }
                3 => {
                    *name = format!("{}.weight", rng.below(64));
                    format!("renamed {name}")
                }
                4 => {
                    *dtype = rng.pick(&["I32", "U8", "BOOL"]).to_string();
                    let n: u64 = shape.iter().product();
                    bytes.resize(n as usize * common::dtype_size(dtype), 1);
                    format!("{name} as {dtype}")
                }
                5 if bytes.len() >= 4 => {
                    let at = 4 * rng.below(bytes.len() / 4);
                    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
                    format!("{name} holds NaN")
                }
                _ => {
                    if shape.len() == 4 {
                        shape[0] += 1;
                        shape[1] += 1;
                        let n: u64 = shape.iter().product();
                        bytes.resize(n as usize * common::dtype_size(dtype), 0);
                    }
                    format!("{name} wider")
                }
            }
        };
        let mut data = write_safetensors(&tensors);
        if rng.below(6) == 0 {
            let at = rng.below(data.len().min(2048));
            data[at] ^= 1 << rng.below(8);
        } else if rng.below(6) == 0 {
            data.truncate(rng.below(data.len()));
        }
        std::fs::write(&path, &data).unwrap();
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let tiny = stable_diffusion::pipeline::load_tiny_vae(&path, &LoadOptions::default())?;
            let _no_grad = tch::no_grad_guard();
            if tiny.has_decoder() {
                drop(tiny.decode(&Tensor::zeros(
                    [1, 4, 6, 6],
                    (Kind::Float, tch::Device::Cpu),
                ))?);
            } else {
                drop(tiny.encode(&Tensor::zeros(
                    [1, 3, 12, 12],
                    (Kind::Float, tch::Device::Cpu),
                ))?);
            }
            Ok::<_, Error>(())
        }));
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(10),
            "case {case} ({how}) took {took:?}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            data,
            "case {case}: file changed"
        );
        match outcome {
            Err(_) => failures.push(format!("case {case} ({how}): panicked")),
            Ok(Ok(())) => loaded += 1,
            Ok(Err(e)) => {
                let text = e.to_string();
                let named = text.contains("taesd.safetensors")
                    || tensors.iter().any(|(n, ..)| text.contains(n.as_str()))
                    || text.contains("AutoencoderTiny")
                    || text.contains("tiny autoencoder");
                if !named {
                    failures.push(format!("case {case} ({how}): `{text}` names nothing"));
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("{cases} hostile tiny autoencoder files: {loaded} loaded and ran");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A single-file checkpoint given as bytes loads as the same file does (`.safetensors` and
/// `.ckpt`, SD 1.x and SDXL): the same images, bit for bit; a progress hook sees every part and
/// can cancel.
#[test]
fn checkpoints_load_from_memory_as_from_files() {
    use stable_diffusion::pipeline::{LoadProgress, LoadProgressHook};
    use stable_diffusion::weights::single_file::ModelOverrides;
    use std::sync::{Arc, Mutex};
    for (file, folder) in [
        ("tiny-sd1.safetensors", "tiny-sd1"),
        ("tiny-sd1.ckpt", "tiny-sd1"),
        ("tiny-sdxl.safetensors", "tiny-sdxl"),
    ] {
        // The tiny models' tokenizers are not the standard CLIP one: their folders say so.
        let overrides = ModelOverrides {
            config_dir: Some(fixtures().join(folder)),
            ..Default::default()
        };
        let path = fixtures().join("single").join(file);
        let data = std::fs::read(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::<LoadProgress>::new()));
        let record = seen.clone();
        let options = LoadOptions {
            progress: Some(LoadProgressHook(Arc::new(move |p: &LoadProgress| {
                record.lock().unwrap().push(p.clone());
                true
            }))),
            ..Default::default()
        };
        let from_memory = StableDiffusion::load_from_memory(file, &data, &options, &overrides)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let from_file =
            StableDiffusion::load_with(&path, &LoadOptions::default(), &overrides).unwrap();
        let params = GenerateParams {
            prompt: "a red ball".into(),
            steps: 2,
            width: Some(32),
            height: Some(32),
            seed: 5,
            ..Default::default()
        };
        let a = from_memory.generate(&params, None).unwrap().pixels;
        let b = from_file.generate(&params, None).unwrap().pixels;
        assert!(a.equal(&b), "{file}: memory and file differ");
        let seen = seen.lock().unwrap();
        let last = seen.last().unwrap();
        assert_eq!(last.component, "done");
        assert_eq!(last.bytes_total, data.len() as u64);
        assert_eq!(last.bytes_done, last.bytes_total, "done reads as all of it");
        assert!(seen.iter().any(|p| p.component == "UNet"), "{file}");
    }
    // Cancelled from the hook: the load fails with Cancelled.
    let path = fixtures().join("single/tiny-sd1.safetensors");
    let data = std::fs::read(&path).unwrap();
    let options = LoadOptions {
        progress: Some(LoadProgressHook(Arc::new(|p: &LoadProgress| {
            p.tensors_done < 10
        }))),
        ..Default::default()
    };
    let e = StableDiffusion::load_from_memory("x", &data, &options, &Default::default());
    assert!(matches!(e, Err(Error::Cancelled)), "{:?}", e.err());
}

/// Hostile buffers given as checkpoints (bytes flipped, cut short, zeroed, grown, or not a
/// checkpoint at all): loading never panics, stays bounded in time, never writes the
/// caller's buffer, and every error names the buffer.
#[test]
fn hostile_buffers_loaded_from_memory_are_refused_never_crash() {
    use common::{Pick, Rng};
    use std::time::{Duration, Instant};
    let cases: usize = std::env::var("SD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let bases: Vec<Vec<u8>> = ["tiny-sd1.safetensors", "tiny-sd1.ckpt"]
        .iter()
        .map(|f| std::fs::read(fixtures().join("single").join(f)).unwrap())
        .collect();
    let mut rng = Rng::new(0x3e3);
    let (mut loaded, mut failures) = (0, Vec::new());
    for case in 0..cases {
        let mut data = rng.pick(&bases).clone();
        let how = match rng.below(6) {
            0 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(data.len().min(1 << 16));
                    data[at] ^= 1 << rng.below(8);
                }
                "header bits flipped"
            }
            1 => {
                data.truncate(rng.below(data.len()));
                "cut short"
            }
            2 => {
                let at = rng.below(data.len());
                let end = (at + 1 + rng.below(4096)).min(data.len());
                data[at..end].fill(0);
                "zeroed run"
            }
            3 => {
                data.extend(std::iter::repeat(0xab).take(rng.below(4096)));
                "grown"
            }
            4 => {
                let at = rng.below(data.len());
                data[at] ^= 0xff;
                "a byte anywhere"
            }
            _ => {
                data = (0..rng.below(64)).map(|_| rng.below(256) as u8).collect();
                "noise"
            }
        };
        let copy = data.clone();
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            StableDiffusion::load_from_memory(
                "packed-model",
                &data,
                &LoadOptions::default(),
                &Default::default(),
            )
            .map(drop)
        }));
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(20),
            "case {case} ({how}) took {took:?}"
        );
        assert_eq!(data, copy, "case {case}: the buffer was written");
        match outcome {
            Err(_) => failures.push(format!("case {case} ({how}): panicked")),
            Ok(Ok(())) => loaded += 1,
            Ok(Err(e)) => {
                let text = e.to_string();
                if !text.contains("packed-model")
                    && !matches!(e, Error::MissingTensor { .. } | Error::ShapeMismatch { .. })
                {
                    failures.push(format!(
                        "case {case} ({how}): `{text}` does not name the buffer"
                    ));
                }
            }
        }
    }
    eprintln!("{cases} hostile buffers: {loaded} loaded");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
