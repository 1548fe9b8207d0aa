//! The TorchScript backend: tests/fixtures/torchscript/tiny-sd2 is tiny-sd2 exported by
//! tools/export_torchscript.py. Every network, and every pipeline mode, must give what the
//! diffusers-folder path gives (and what diffusers / transformers computed, for the references
//! in tiny-sd2-refs.safetensors).
mod common;

use common::{assert_close, cases, copy_dir, fixtures, max_abs_diff, Refs};
use stable_diffusion::image_io::Image;
use stable_diffusion::pipeline::{GenerateParams, LoadOptions, StableDiffusion};
use stable_diffusion::Error;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn export_dir() -> PathBuf {
    fixtures().join("torchscript").join("tiny-sd2")
}

fn load(path: &Path) -> StableDiffusion {
    StableDiffusion::load(path, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The same model twice: (diffusers folder, TorchScript export).
fn both() -> (StableDiffusion, StableDiffusion) {
    (load(&fixtures().join("tiny-sd2")), load(&export_dir()))
}

/// Asserts the TorchScript output is within `TOL` of the folder path's.
fn assert_same(what: &str, torchscript: &Tensor, folder: &Tensor) {
    assert_close(
        &format!("{what} (TorchScript vs folder)"),
        torchscript,
        folder,
        TOL,
    );
}

#[test]
fn text_encoder_matches_folder_and_transformers() {
    let _g = tch::no_grad_guard();
    let (folder, ts) = both();
    let refs = Refs::open("tiny-sd2");
    let ids = refs.get("text_ids");
    for (skip, reference) in [
        (0, Some("text_hidden")),
        (1, Some("text_hidden_skip1")),
        (2, None),
    ] {
        let got = ts.text_encoder.forward(&ids, skip).unwrap();
        let want = folder.text_encoder.forward(&ids, skip).unwrap();
        assert_same(&format!("text hidden, clip_skip {skip}"), &got, &want);
        if let Some(name) = reference {
            assert_close(&format!("TorchScript {name}"), &got, &refs.get(name), TOL);
        }
    }
    // The prompt path: tokenizer from the export's tokenizer/ folder.
    let prompt = cases("tiny-sd2")["text_prompts"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        ts.tokenizer.encode_padded(&prompt),
        folder.tokenizer.encode_padded(&prompt)
    );
    assert_same(
        "encode_prompt",
        &ts.encode_prompt(&prompt, 2, 1).unwrap(),
        &folder.encode_prompt(&prompt, 2, 1).unwrap(),
    );
    // Three layers: clip_skip 3 would leave none.
    let err = ts.text_encoder.forward(&ids, 3).unwrap_err().to_string();
    assert!(err.contains("clip_skip 3"), "{err}");
}

#[test]
fn vae_matches_folder_and_diffusers() {
    let _g = tch::no_grad_guard();
    let (folder, ts) = both();
    let refs = Refs::open("tiny-sd2");
    let x = refs.get("vae_input");
    let got = ts.vae.encode(&x).unwrap();
    let want = folder.vae.encode(&x).unwrap();
    assert_same("vae mean", &got.mean, &want.mean);
    assert_same("vae logvar", &got.logvar, &want.logvar);
    assert_close(
        "TorchScript vae_mean",
        &got.mean,
        &refs.get("vae_mean"),
        TOL,
    );
    assert_close(
        "TorchScript vae_logvar",
        &got.logvar,
        &refs.get("vae_logvar"),
        TOL,
    );

    let z = refs.get("vae_latents");
    let decoded = ts.vae.decode(&z).unwrap();
    assert_same("vae decode", &decoded, &folder.vae.decode(&z).unwrap());
    assert_close(
        "TorchScript vae_decoded",
        &decoded,
        &refs.get("vae_decoded"),
        TOL,
    );

    // A batch and size other than the traced ones.
    let x2 = common::locked_rand(&[2, 3, 24, 40]) * 2.0 - 1.0;
    assert_same(
        "vae mean, batch 2 24x40",
        &ts.vae.encode(&x2).unwrap().mean,
        &folder.vae.encode(&x2).unwrap().mean,
    );
    for (name, a, b) in [
        (
            "latent_channels",
            ts.vae.latent_channels(),
            folder.vae.latent_channels(),
        ),
        (
            "spatial_scale",
            ts.vae.spatial_scale(),
            folder.vae.spatial_scale(),
        ),
    ] {
        assert_eq!(a, b, "{name}");
    }
    assert_eq!(ts.vae.scaling_factor(), folder.vae.scaling_factor());
    assert_eq!(ts.vae.shift_factor(), folder.vae.shift_factor());
}

#[test]
fn unet_matches_folder_and_diffusers() {
    let _g = tch::no_grad_guard();
    let (folder, ts) = both();
    let refs = Refs::open("tiny-sd2");
    let meta = cases("tiny-sd2");
    for (prefix, t) in [
        ("unet", meta["unet_timestep"].as_f64().unwrap()),
        ("unet_odd", meta["unet_odd_timestep"].as_f64().unwrap()),
    ] {
        let sample = refs.get(&format!("{prefix}_sample"));
        let ehs = refs.get(&format!("{prefix}_ehs"));
        let got = ts.unet.forward(&sample, t, &ehs).unwrap();
        let want = folder.unet.forward(&sample, t, &ehs).unwrap();
        assert_same(&format!("{prefix} {:?}", sample.size()), &got, &want);
        assert_close(
            &format!("TorchScript {prefix}_out"),
            &got,
            &refs.get(&format!("{prefix}_out")),
            TOL,
        );
    }
    // Batch 3 at 12x8 latents, a fractional timestep: nothing baked into the trace.
    let sample = common::locked_randn(&[3, 4, 12, 8]);
    let ehs = common::locked_randn(&[3, 77, 32]);
    assert_same(
        "unet batch 3 12x8",
        &ts.unet.forward(&sample, 321.5, &ehs).unwrap(),
        &folder.unet.forward(&sample, 321.5, &ehs).unwrap(),
    );
    assert_eq!(ts.unet.in_channels(), folder.unet.in_channels());
    assert_eq!(ts.unet.sample_size(), folder.unet.sample_size());
    assert_eq!(ts.default_size(), folder.default_size());

    let bad = Tensor::zeros([1, 3, 8, 8], (Kind::Float, Device::Cpu));
    let ctx = Tensor::zeros([1, 77, 32], (Kind::Float, Device::Cpu));
    let err = ts.unet.forward(&bad, 1.0, &ctx).unwrap_err().to_string();
    assert!(err.contains("3 channels"), "{err}");
    let err = ts
        .unet
        .forward(
            &sample.narrow(0, 0, 1),
            1.0,
            &ehs.narrow(0, 0, 1).narrow(2, 0, 16),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("16 features"), "{err}");
}

/// Runs `params` through both loading paths and compares the float images.
fn same_images(
    what: &str,
    folder: &StableDiffusion,
    ts: &StableDiffusion,
    params: &GenerateParams,
) {
    let want = folder
        .generate(params, None)
        .unwrap_or_else(|e| panic!("{what}, folder: {e}"));
    let got = ts
        .generate(params, None)
        .unwrap_or_else(|e| panic!("{what}, TorchScript: {e}"));
    assert_same(what, &got.pixels, &want.pixels);
}

#[test]
fn txt2img_ddim_and_euler_ancestral_match_folder() {
    let (folder, ts) = both();
    let refs = Refs::open("tiny-sd2");
    let doc = cases("tiny-sd2");
    let case = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["scheduler"] == "DDIMScheduler")
        .expect("a DDIM case in tiny-sd2-cases.json");
    let params = common::case_params(case);
    let got = ts.txt2img(&params, None).unwrap();
    let want = folder.txt2img(&params, None).unwrap();
    assert_same("txt2img DDIM", &got.pixels, &want.pixels);
    let name = case["name"].as_str().unwrap();
    assert_close(
        "TorchScript txt2img DDIM vs diffusers",
        &got.pixels,
        &refs.get(&format!("pipe_{name}")),
        1e-3,
    );

    // An ancestral sampler (noise drawn at every step), batch 2, non-square, clip_skip 1.
    let params = GenerateParams {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: Some("blurry".into()),
        steps: 5,
        guidance: 6.0,
        seed: 11,
        width: Some(48),
        height: Some(32),
        batch: 2,
        scheduler: Some("Euler a".into()),
        clip_skip: 1,
        ..Default::default()
    };
    same_images("txt2img Euler a", &folder, &ts, &params);
}

/// A deterministic picture: a gradient with a dark bar.
fn synthetic(width: u32, height: u32) -> Image {
    let mut rgb = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            let bar = (width / 3..width / 2).contains(&x);
            let r = (20 + 200 * x / width) as u8;
            let g = (40 + 180 * y / height) as u8;
            let b = if bar { 10 } else { 160 };
            rgb.extend_from_slice(&[r, g, b]);
        }
    }
    Image::new(width, height, rgb).unwrap()
}

/// White (repaint) inside `x0..x1, y0..y1`, black elsewhere.
fn rect_mask(width: u32, height: u32, x0: u32, y0: u32, x1: u32, y1: u32) -> Image {
    let mut rgb = vec![0u8; (width * height * 3) as usize];
    for y in y0..y1 {
        for x in x0..x1 {
            let i = ((y * width + x) * 3) as usize;
            rgb[i..i + 3].copy_from_slice(&[255, 255, 255]);
        }
    }
    Image::new(width, height, rgb).unwrap()
}

#[test]
fn img2img_and_inpainting_match_folder() {
    let (folder, ts) = both();
    let base = GenerateParams {
        prompt: "a watercolor castle".into(),
        steps: 6,
        guidance: 5.0,
        seed: 3,
        init_image: Some(synthetic(40, 32)),
        ..Default::default()
    };
    let img2img = GenerateParams {
        strength: Some(0.6),
        scheduler: Some("ddim".into()),
        ..base.clone()
    };
    same_images("img2img DDIM strength 0.6", &folder, &ts, &img2img);
    let img2img_a = GenerateParams {
        strength: Some(0.8),
        scheduler: Some("Euler a".into()),
        ..base.clone()
    };
    same_images("img2img Euler a strength 0.8", &folder, &ts, &img2img_a);

    // 4-channel inpainting: the known region is re-imposed at every step.
    let inpaint = GenerateParams {
        mask: Some(rect_mask(40, 32, 8, 4, 28, 20)),
        strength: Some(0.75),
        ..base.clone()
    };
    same_images("inpaint 4-channel strength 0.75", &folder, &ts, &inpaint);
    let inpaint_full = GenerateParams {
        mask: Some(rect_mask(40, 32, 0, 16, 40, 32)),
        strength: None,
        paste_back: true,
        scheduler: Some("dpmpp_2m".into()),
        ..base
    };
    same_images(
        "inpaint 4-channel strength 1, paste-back",
        &folder,
        &ts,
        &inpaint_full,
    );
}

#[test]
fn other_dtype_is_converted_at_the_module_boundaries() {
    let _g = tch::no_grad_guard();
    let options = LoadOptions {
        device: Device::Cpu,
        kind: Kind::BFloat16,
        ..Default::default()
    };
    let ts = StableDiffusion::load(&export_dir(), &options).unwrap();
    let fp32 = load(&export_dir());
    let emb = ts.encode_prompt("a red door", 1, 0).unwrap();
    assert_eq!(emb.kind(), Kind::BFloat16);
    let want = fp32.encode_prompt("a red door", 1, 0).unwrap();
    // The modules compute in fp32; only the result is rounded to bf16.
    let err = max_abs_diff(&emb, &want);
    assert!(err <= 0.05, "bf16 embeddings differ by {err}");
    let latents = common::locked_randn(&[1, 4, 8, 8]);
    let out = ts
        .unet
        .forward(&latents.to_kind(Kind::BFloat16), 500.0, &emb)
        .unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    let decoded = ts.vae.decode(&latents.to_kind(Kind::BFloat16)).unwrap();
    assert_eq!(decoded.kind(), Kind::BFloat16);
}

#[test]
fn other_device_than_the_traced_one_is_refused() {
    let options = LoadOptions {
        device: Device::Cuda(0),
        kind: Kind::Float,
        ..Default::default()
    };
    let err = StableDiffusion::load(&export_dir(), &options)
        .err()
        .expect("a CPU trace loaded for CUDA");
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("traced on cpu") && msg.contains("--device cuda"),
        "{msg}"
    );
}

/// A scratch copy of the export folder, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("sd-torchscript-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        copy_dir(&export_dir(), &dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load_error(dir: &Path) -> Error {
    StableDiffusion::load(dir, &LoadOptions::default())
        .err()
        .unwrap_or_else(|| panic!("{} loaded", dir.display()))
}

#[test]
fn damaged_exports_are_clear_errors() {
    // Not JSON at all.
    let s = Scratch::new("corrupt-manifest");
    std::fs::write(s.0.join("manifest.json"), "{ \"format\": \"stable-diff").unwrap();
    let err = load_error(&s.0);
    let msg = err.to_string();
    assert!(matches!(err, Error::Json { .. }), "{msg}");
    assert!(msg.contains("manifest.json"), "{msg}");

    // JSON, but missing fields.
    std::fs::write(
        s.0.join("manifest.json"),
        r#"{"format": "stable-diffusion-torchscript", "version": 1, "dtype": "fp32"}"#,
    )
    .unwrap();
    let msg = load_error(&s.0).to_string();
    assert!(
        msg.contains("manifest.json") && msg.contains("unet"),
        "{msg}"
    );

    // Wrong format name, unknown version, unknown dtype, inconsistent channels.
    let good = std::fs::read_to_string(export_dir().join("manifest.json")).unwrap();
    let mut value: serde_json::Value = serde_json::from_str(&good).unwrap();
    for (field, bad, expect) in [
        (
            "format",
            serde_json::json!("onnx"),
            "expected \"stable-diffusion-torchscript\"",
        ),
        ("version", serde_json::json!(7), "version 7"),
        ("dtype", serde_json::json!("int8"), "dtype \"int8\""),
        ("device", serde_json::json!("tpu"), "device \"tpu\""),
    ] {
        let saved = value[field].clone();
        value[field] = bad;
        std::fs::write(s.0.join("manifest.json"), value.to_string()).unwrap();
        let msg = load_error(&s.0).to_string();
        assert!(
            msg.contains("manifest.json") && msg.contains(expect),
            "{field}: {msg}"
        );
        value[field] = saved;
    }
    value["vae"]["latent_channels"] = serde_json::json!(8);
    std::fs::write(s.0.join("manifest.json"), value.to_string()).unwrap();
    let msg = load_error(&s.0).to_string();
    assert!(msg.contains("latent_channels 8"), "{msg}");

    // A manifest whose dtype is not the modules' dtype.
    value["vae"]["latent_channels"] = serde_json::json!(4);
    value["dtype"] = serde_json::json!("fp16");
    std::fs::write(s.0.join("manifest.json"), value.to_string()).unwrap();
    let msg = load_error(&s.0).to_string();
    assert!(
        msg.contains("text_encoder.pt") && msg.contains("Half"),
        "{msg}"
    );

    // Missing unet.pt.
    let s = Scratch::new("missing-unet");
    std::fs::remove_file(s.0.join("unet.pt")).unwrap();
    let err = load_error(&s.0);
    let msg = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{msg}");
    assert!(msg.contains("unet.pt"), "{msg}");

    // A unet.pt that is not a TorchScript archive.
    std::fs::write(s.0.join("unet.pt"), b"this is not a zip archive").unwrap();
    let err = load_error(&s.0);
    let msg = err.to_string();
    assert!(matches!(err, Error::BadModel(_)), "{msg}");
    assert!(msg.contains("unet.pt"), "{msg}");

    // A unet.pt that is some other module: loads, then fails naming the file.
    let s = Scratch::new("swapped-unet");
    std::fs::copy(s.0.join("vae_decoder.pt"), s.0.join("unet.pt")).unwrap();
    let ts = StableDiffusion::load(&s.0, &LoadOptions::default()).unwrap();
    let sample = Tensor::zeros([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let ctx = Tensor::zeros([1, 77, 32], (Kind::Float, Device::Cpu));
    let err = ts.unet.forward(&sample, 1.0, &ctx).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Torch(_)), "{msg}");
    assert!(msg.contains("unet.pt") && !msg.contains("frame #"), "{msg}");
    eprintln!("swapped unet.pt: {msg}");

    // Missing scheduler config and tokenizer.
    let s = Scratch::new("missing-scheduler");
    std::fs::remove_dir_all(s.0.join("scheduler")).unwrap();
    let msg = load_error(&s.0).to_string();
    assert!(msg.contains("scheduler_config.json"), "{msg}");
    let s = Scratch::new("missing-tokenizer");
    std::fs::remove_dir_all(s.0.join("tokenizer")).unwrap();
    let msg = load_error(&s.0).to_string();
    assert!(msg.contains("tokenizer"), "{msg}");
}

#[test]
fn cli_generates_from_the_torchscript_folder() {
    let out = std::env::temp_dir().join(format!("sd-torchscript-cli-{}.png", std::process::id()));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sd"))
        .args(["txt2img", "--model"])
        .arg(export_dir())
        .args([
            "--prompt",
            "a red circle",
            "--steps",
            "3",
            "--width",
            "32",
            "--height",
            "24",
            "--seed",
            "5",
            "--scheduler",
            "Euler a",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run target/debug/sd");
    assert!(
        status.status.success(),
        "sd txt2img failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let img = image::open(&out).expect("a PNG").to_rgb8();
    assert_eq!(img.dimensions(), (32, 24));
    let _ = std::fs::remove_file(&out);
}

/// RGB bytes of every image the C ABI generates from `model` with a small fixed request.
fn c_abi_generate(model: &Path) -> Vec<Vec<u8>> {
    use stable_diffusion::ffi::*;
    let path = std::ffi::CString::new(model.to_str().unwrap()).unwrap();
    let prompt = c"a red circle";
    unsafe {
        let mut pipe = std::ptr::null_mut();
        let status = sd_pipeline_load(path.as_ptr(), std::ptr::null(), &mut pipe);
        assert_eq!(status, sd_status::SD_OK, "{}", c_last_error());
        let mut p = std::mem::MaybeUninit::<sd_generate_params>::zeroed();
        let size = std::mem::size_of::<sd_generate_params>();
        assert_eq!(
            sd_generate_params_init(p.as_mut_ptr(), size),
            sd_status::SD_OK
        );
        let mut p = p.assume_init();
        p.prompt = prompt.as_ptr();
        p.steps = 3;
        p.seed = 2;
        p.width = 32;
        p.height = 24;
        let mut images = std::ptr::null_mut();
        let status = sd_generate(pipe, &p, &mut images);
        assert_eq!(status, sd_status::SD_OK, "{}", c_last_error());
        let mut n = 0usize;
        assert_eq!(sd_images_count(images, &mut n), sd_status::SD_OK);
        let out = (0..n)
            .map(|i| {
                let mut img: *const sd_image = std::ptr::null();
                assert_eq!(sd_images_get(images, i, &mut img), sd_status::SD_OK);
                let img = &*img;
                assert_eq!((img.width, img.height, img.channels), (32, 24, 3));
                let mut rgb = Vec::new();
                for row in 0..img.height {
                    let start = img.data.add((row * img.stride) as usize);
                    rgb.extend_from_slice(std::slice::from_raw_parts(start, 32 * 3));
                }
                rgb
            })
            .collect();
        sd_images_free(images);
        sd_pipeline_free(pipe);
        out
    }
}

fn c_last_error() -> String {
    unsafe { std::ffi::CStr::from_ptr(stable_diffusion::ffi::sd_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn c_abi_loads_the_torchscript_folder() {
    let ts = c_abi_generate(&export_dir());
    let folder = c_abi_generate(&fixtures().join("tiny-sd2"));
    assert_eq!(ts.len(), folder.len());
    for (a, b) in ts.iter().zip(&folder) {
        // Float images within 1e-4 may still round to neighbouring bytes.
        let worst = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        assert!(worst <= 1, "8-bit images differ by {worst}");
    }

    let s = Scratch::new("c-abi-corrupt-manifest");
    std::fs::write(s.0.join("manifest.json"), "not json").unwrap();
    let path = std::ffi::CString::new(s.0.to_str().unwrap()).unwrap();
    let mut pipe = std::ptr::null_mut();
    let status = unsafe {
        stable_diffusion::ffi::sd_pipeline_load(path.as_ptr(), std::ptr::null(), &mut pipe)
    };
    let msg = c_last_error();
    assert_eq!(
        status,
        stable_diffusion::ffi::sd_status::SD_ERR_BAD_MODEL,
        "{msg}"
    );
    assert!(msg.contains("manifest.json"), "{msg}");
    assert!(pipe.is_null());
}

/// A TorchScript UNet has none of the fast modes: asking for any is refused by name before the
/// run, and the exact settings still run.
#[test]
fn fast_modes_are_refused_for_torchscript_modules() {
    use stable_diffusion::pipeline::FastModes;
    let ts = load(&export_dir());
    for fast in [
        FastModes {
            cache_interval: 2,
            ..Default::default()
        },
        FastModes {
            token_merging: 0.5,
            ..Default::default()
        },
        FastModes {
            int8_linear: true,
            ..Default::default()
        },
    ] {
        let params = GenerateParams {
            prompt: "x".into(),
            fast,
            ..Default::default()
        };
        match ts.validate(&params) {
            Err(Error::Unsupported(why)) => assert!(why.contains("TorchScript"), "{why}"),
            Err(e) => panic!("{fast:?}: {e}"),
            Ok(_) => panic!("{fast:?} accepted for a TorchScript UNet"),
        }
    }
    let exact = GenerateParams {
        prompt: "x".into(),
        fast: FastModes {
            cache_interval: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    ts.validate(&exact).unwrap();
}
