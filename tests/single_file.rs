//! Single-file checkpoints in the original CompVis / A1111 layout (tests/fixtures/single/, made
//! by tools/fixtures/single_file.py from the tiny diffusers folders and checked there with
//! diffusers' own `from_single_file`): every loading path gives the folder's tensors and
//! images; family, prediction type and configs are detected from the file; EMA weights and the
//! known key variants load; a malicious pickle is refused without running; broken and unknown
//! files give clear errors.
//!
//! The single files store float16 (as "pruned fp16" downloads do; one SDXL refiner file
//! bfloat16), so tensors are compared with the folder's rounded to the file's dtype (max abs 0),
//! and images are compared with both models held in that dtype, where their weights are
//! identical.
//!
//! SDXL (tests/fixtures/single/tiny-sdxl*, made by tools/fixtures/single_file_sdxl.py from the
//! tiny-sdxl folders and checked there with diffusers' `StableDiffusionXL*Pipeline.
//! from_single_file`): both text encoders (bigG's fused `in_proj` and transposed projection),
//! the `text_time` UNet (`label_emb`), the VAE; base, refiner, inpainting and v-prediction
//! detection; `config_dir` with `text_encoder_2/`, `tokenizer_2/` and the model_index flags.
mod common;

use common::{fixtures, max_abs_diff};
use stable_diffusion::image_io::Image;
use stable_diffusion::models::{
    AutoencoderKL, ClipTextConfig, ClipTextTransformer, UNet2DConditionModel, UNetConfig, VaeConfig,
};
use stable_diffusion::pipeline::{GenerateParams, LoadOptions, StableDiffusion};
use stable_diffusion::schedulers::PredictionType;
use stable_diffusion::weights::single_file::{
    detect_format, Checkpoint, ComponentSource, Family, Layout, ModelFormat, ModelOverrides,
    SingleFileConfigs, TextLayout,
};
use stable_diffusion::weights::{load_into_from, TensorSource, WeightSet};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

fn single(name: &str) -> PathBuf {
    fixtures().join("single").join(name)
}

fn with_config(folder: &str) -> ModelOverrides {
    ModelOverrides {
        config_dir: Some(fixtures().join(folder)),
        ..Default::default()
    }
}

fn half() -> LoadOptions {
    LoadOptions {
        kind: Kind::Half,
        ..Default::default()
    }
}

fn tmp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sd-single-file-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The models of a folder: (folder-loaded, single-file-loaded) variables, both fp32.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    /// The first text encoder (the SDXL refiner's only one, its text_encoder_2/).
    Text,
    /// The SDXL base's second text encoder.
    Text2,
    Unet,
    Vae,
}

/// The folder of a text part: the SDXL refiner has only text_encoder_2/.
fn text_dir(folder: &Path, part: Part) -> &'static str {
    if part == Part::Text2 || !folder.join("text_encoder").is_dir() {
        "text_encoder_2"
    } else {
        "text_encoder"
    }
}

fn build(part: Part, folder: &Path, vs: &VarStore) {
    match part {
        Part::Text | Part::Text2 => {
            let dir = text_dir(folder, part);
            let c = ClipTextConfig::from_file(&folder.join(dir).join("config.json")).unwrap();
            ClipTextTransformer::new(vs.root(), &c).unwrap();
        }
        Part::Unet => {
            let c = UNetConfig::from_file(&folder.join("unet/config.json")).unwrap();
            UNet2DConditionModel::new(vs.root(), &c).unwrap();
        }
        Part::Vae => {
            let c = VaeConfig::from_file(&folder.join("vae/config.json")).unwrap();
            AutoencoderKL::new(vs.root(), &c).unwrap();
        }
    }
}

fn folder_vars(model: &str, part: Part) -> HashMap<String, Tensor> {
    let folder = fixtures().join(model);
    let vs = VarStore::new(Device::Cpu);
    build(part, &folder, &vs);
    let (dir, stem) = match part {
        Part::Text | Part::Text2 => (text_dir(&folder, part), "model"),
        Part::Unet => ("unet", "diffusion_pytorch_model"),
        Part::Vae => ("vae", "diffusion_pytorch_model"),
    };
    let w = WeightSet::find_in_dir(&folder.join(dir), stem).unwrap();
    w.load_into_with(&vs, |n| {
        let mut keys = vec![n.to_string()];
        if let Some(bare) = n.strip_prefix("text_model.") {
            keys.push(bare.to_string());
        }
        keys
    })
    .unwrap();
    vs.variables()
}

fn source_vars(
    ckpt: &Checkpoint,
    layout: &Layout,
    model: &str,
    part: Part,
) -> stable_diffusion::Result<HashMap<String, Tensor>> {
    let folder = fixtures().join(model);
    let vs = VarStore::new(Device::Cpu);
    build(part, &folder, &vs);
    let unet_cfg = UNetConfig::from_file(&folder.join("unet/config.json")).unwrap();
    let vae_cfg = VaeConfig::from_file(&folder.join("vae/config.json")).unwrap();
    let source: Box<dyn TensorSource> = match part {
        Part::Text => Box::new(ComponentSource::text_encoder(ckpt, layout)),
        Part::Text2 => Box::new(ComponentSource::text_encoder_2(ckpt, layout)),
        Part::Unet => Box::new(ComponentSource::unet(ckpt, layout, &unet_cfg)?),
        Part::Vae => Box::new(ComponentSource::vae(ckpt, layout, &vae_cfg)),
    };
    load_into_from(source.as_ref(), &vs, |n| vec![n.to_string()])?;
    Ok(vs.variables())
}

fn single_vars(file: &str, model: &str, part: Part) -> HashMap<String, Tensor> {
    let ckpt = Checkpoint::open(&single(file)).unwrap();
    let layout = Layout::detect(&ckpt, true).unwrap();
    source_vars(&ckpt, &layout, model, part).unwrap_or_else(|e| panic!("{file} {part:?}: {e}"))
}

/// Every variable equal to the folder's rounded to float16, to the bit.
fn assert_same_vars(what: &str, folder: &HashMap<String, Tensor>, got: &HashMap<String, Tensor>) {
    assert_same_vars_in(what, folder, got, Kind::Half)
}

/// Every variable equal to the folder's rounded to `stored` (the file's dtype), to the bit.
fn assert_same_vars_in(
    what: &str,
    folder: &HashMap<String, Tensor>,
    got: &HashMap<String, Tensor>,
    stored: Kind,
) {
    assert_eq!(folder.len(), got.len(), "{what}: variable count");
    let mut nonzero = 0;
    for (name, expected) in folder {
        let actual = got.get(name).unwrap_or_else(|| panic!("{what}: no {name}"));
        let expected = expected.to_kind(stored).to_kind(Kind::Float);
        let err = max_abs_diff(actual, &expected);
        assert_eq!(err, 0.0, "{what}: {name} differs by {err:e}");
        if expected.abs().max().double_value(&[]) > 0.0 {
            nonzero += 1;
        }
    }
    assert!(nonzero * 2 > folder.len(), "{what}: mostly zero tensors");
    eprintln!("{what}: {} tensors equal to the folder's", folder.len());
}

const CASES: [(&str, &str); 4] = [
    ("tiny-sd1.safetensors", "tiny-sd1"),
    ("tiny-sd1.ckpt", "tiny-sd1"),
    ("tiny-sd2.safetensors", "tiny-sd2"),
    ("tiny-sd1-inpaint.safetensors", "tiny-sd1-inpaint"),
];

#[test]
fn every_single_file_gives_the_folder_tensors() {
    for (file, model) in CASES {
        for part in [Part::Text, Part::Unet, Part::Vae] {
            assert_same_vars(
                &format!("{file} {part:?}"),
                &folder_vars(model, part),
                &single_vars(file, model, part),
            );
        }
    }
}

#[test]
fn ckpt_holds_the_same_tensors_as_the_safetensors_file() {
    let st = Checkpoint::open(&single("tiny-sd1.safetensors")).unwrap();
    let ck = Checkpoint::open(&single("tiny-sd1.ckpt")).unwrap();
    assert_eq!(ck.global_step(), Some(470000));
    let mut a: Vec<&str> = st.names().collect();
    let mut b: Vec<&str> = ck.names().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for name in a {
        let (x, y) = (st.tensor(name).unwrap(), ck.tensor(name).unwrap());
        assert_eq!(x.kind(), y.kind(), "{name}");
        assert_eq!(x.size(), y.size(), "{name}");
        assert!(x.equal(&y), "{name}");
    }
}

#[test]
fn detects_family_prediction_and_configs() {
    let open = |f: &str| Checkpoint::open(&single(f)).unwrap();
    let sd1 = open("tiny-sd1.safetensors");
    let l = Layout::detect(&sd1, true).unwrap();
    assert_eq!(l.family, Family::Sd1);
    assert_eq!(l.in_channels, 4);
    assert_eq!(l.prediction_type, PredictionType::Epsilon);
    assert!(matches!(l.text, TextLayout::Clip { .. }));
    assert!(!l.has_ema);

    let sd2 = open("tiny-sd2.safetensors");
    let l2 = Layout::detect(&sd2, true).unwrap();
    assert_eq!(l2.family, Family::Sd2);
    assert_eq!(l2.prediction_type, PredictionType::VPrediction);
    assert!(matches!(l2.text, TextLayout::OpenClip { .. }));

    let inpaint = open("tiny-sd1-inpaint.safetensors");
    let li = Layout::detect(&inpaint, true).unwrap();
    assert_eq!((li.family, li.in_channels), (Family::Sd1, 9));
    assert!(li.is_inpainting());
    assert_eq!(li.prediction_type, PredictionType::Epsilon);

    // The sizes in the shapes agree with the folders' configs.
    for (ckpt, layout, model) in [
        (&sd1, &l, "tiny-sd1"),
        (&sd2, &l2, "tiny-sd2"),
        (&inpaint, &li, "tiny-sd1-inpaint"),
    ] {
        let got = SingleFileConfigs::defaults(ckpt, layout).unwrap();
        let dir = fixtures().join(model);
        let unet = UNetConfig::from_file(&dir.join("unet/config.json")).unwrap();
        let n = unet.block_out_channels.len();
        assert_eq!(got.unet.in_channels, unet.in_channels, "{model}");
        assert_eq!(got.unet.out_channels, unet.out_channels, "{model}");
        assert_eq!(
            got.unet.block_out_channels, unet.block_out_channels,
            "{model}"
        );
        assert_eq!(
            got.unet.layers_per_block.expand(n, "l").unwrap(),
            unet.layers_per_block.expand(n, "l").unwrap(),
            "{model}"
        );
        assert_eq!(got.unet.down_block_types, unet.down_block_types, "{model}");
        assert_eq!(got.unet.up_block_types, unet.up_block_types, "{model}");
        assert_eq!(
            got.unet.cross_attention_dim.expand(n, "c").unwrap(),
            unet.cross_attention_dim.expand(n, "c").unwrap(),
            "{model}"
        );
        assert_eq!(
            got.unet.use_linear_projection, unet.use_linear_projection,
            "{model}"
        );
        let vae = VaeConfig::from_file(&dir.join("vae/config.json")).unwrap();
        assert_eq!(
            got.vae.block_out_channels, vae.block_out_channels,
            "{model}"
        );
        assert_eq!(got.vae.layers_per_block, vae.layers_per_block, "{model}");
        assert_eq!(got.vae.latent_channels, vae.latent_channels, "{model}");
        let text = ClipTextConfig::from_file(&dir.join("text_encoder/config.json")).unwrap();
        assert_eq!(got.text.hidden_size, text.hidden_size, "{model}");
        assert_eq!(
            got.text.num_hidden_layers, text.num_hidden_layers,
            "{model}"
        );
        assert_eq!(
            got.text.intermediate_size, text.intermediate_size,
            "{model}"
        );
        assert_eq!(got.text.vocab_size, text.vocab_size, "{model}");
        assert_eq!(got.text.hidden_act, text.hidden_act, "{model}");
    }

    for (file, format) in [
        ("tiny-sd1.safetensors", ModelFormat::Safetensors),
        ("tiny-sd1.ckpt", ModelFormat::Ckpt),
    ] {
        assert_eq!(detect_format(&single(file)).unwrap(), format);
    }
    assert_eq!(
        detect_format(&fixtures().join("tiny-sd1")).unwrap(),
        ModelFormat::DiffusersFolder
    );
}

#[test]
fn prediction_type_detection_and_override() {
    let sd =
        StableDiffusion::load(&single("tiny-sd2.safetensors"), &LoadOptions::default()).unwrap();
    assert_eq!(
        sd.scheduler_config.prediction_type,
        Some(PredictionType::VPrediction)
    );
    assert_eq!(
        sd.scheduler_config.class_name.as_deref(),
        Some("DDIMScheduler")
    );
    let sd1 = StableDiffusion::load(&single("tiny-sd1.ckpt"), &LoadOptions::default()).unwrap();
    assert_eq!(
        sd1.scheduler_config.prediction_type,
        Some(PredictionType::Epsilon)
    );

    let forced = ModelOverrides {
        prediction_type: Some(PredictionType::Epsilon),
        ..Default::default()
    };
    let sd = StableDiffusion::load_with(
        &single("tiny-sd2.safetensors"),
        &LoadOptions::default(),
        &forced,
    )
    .unwrap();
    assert_eq!(
        sd.scheduler_config.prediction_type,
        Some(PredictionType::Epsilon)
    );
    // The override applies over a config folder's scheduler and to folders too.
    let forced_v = ModelOverrides {
        prediction_type: Some(PredictionType::VPrediction),
        ..with_config("tiny-sd1")
    };
    let sd = StableDiffusion::load_with(
        &single("tiny-sd1.safetensors"),
        &LoadOptions::default(),
        &forced_v,
    )
    .unwrap();
    assert_eq!(
        sd.scheduler_config.prediction_type,
        Some(PredictionType::VPrediction)
    );
    let sd = StableDiffusion::load_with(
        &fixtures().join("tiny-sd1"),
        &LoadOptions::default(),
        &forced_v,
    )
    .unwrap();
    assert_eq!(
        sd.scheduler_config.prediction_type,
        Some(PredictionType::VPrediction)
    );

    // ModelSpec metadata in a safetensors file says v-prediction.
    let dir = tmp_dir("meta");
    let path = dir.join("v.safetensors");
    rewrite(
        &single("tiny-sd1.safetensors"),
        &path,
        |name, t| vec![(name.to_string(), t)],
        Some(HashMap::from([(
            "modelspec.prediction_type".to_string(),
            "v".to_string(),
        )])),
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(
        Layout::detect(&ckpt, true).unwrap().prediction_type,
        PredictionType::VPrediction
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Copies the safetensors file `src` to `dst`, with `f` giving the new entries for each tensor.
fn rewrite(
    src: &Path,
    dst: &Path,
    f: impl Fn(&str, Tensor) -> Vec<(String, Tensor)>,
    metadata: Option<HashMap<String, String>>,
) {
    let ckpt = Checkpoint::open(src).unwrap();
    let mut names: Vec<&str> = ckpt.names().collect();
    names.sort();
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for name in names {
        out.extend(f(name, ckpt.tensor(name).unwrap()));
    }
    let bufs: Vec<(String, Vec<u8>, safetensors::Dtype, Vec<usize>)> = out
        .iter()
        .map(|(n, t)| {
            let t = t.contiguous();
            let dtype = match t.kind() {
                Kind::Half => safetensors::Dtype::F16,
                Kind::BFloat16 => safetensors::Dtype::BF16,
                Kind::Float => safetensors::Dtype::F32,
                Kind::Int64 => safetensors::Dtype::I64,
                k => panic!("{k:?}"),
            };
            let numel = t.numel();
            let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut bytes, numel);
            (
                n.clone(),
                bytes,
                dtype,
                t.size().iter().map(|&d| d as usize).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(n, b, d, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, metadata, dst).unwrap();
}

#[test]
fn ema_weights_are_used_when_present() {
    // The UNet moved to its EMA names, with zeros left under the usual names.
    let dir = tmp_dir("ema");
    let path = dir.join("ema.safetensors");
    rewrite(
        &single("tiny-sd1.safetensors"),
        &path,
        |name, t| match name.strip_prefix("model.diffusion_model.") {
            Some(rest) => vec![
                (
                    format!("model_ema.diffusion_model{}", rest.replace('.', "")),
                    t.shallow_clone(),
                ),
                (name.to_string(), t.zeros_like()),
            ],
            None => vec![(name.to_string(), t)],
        },
        None,
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let layout = Layout::detect(&ckpt, true).unwrap();
    assert!(layout.has_ema && layout.ema);
    let folder = folder_vars("tiny-sd1", Part::Unet);
    assert_same_vars(
        "EMA UNet",
        &folder,
        &source_vars(&ckpt, &layout, "tiny-sd1", Part::Unet).unwrap(),
    );
    // Asking for the non-EMA weights gives the zeros.
    let layout = Layout::detect(&ckpt, false).unwrap();
    assert!(layout.has_ema && !layout.ema);
    let vars = source_vars(&ckpt, &layout, "tiny-sd1", Part::Unet).unwrap();
    assert!(vars
        .values()
        .all(|t| t.abs().max().double_value(&[]) == 0.0));
    let _ = std::fs::remove_dir_all(dir);
}

/// A file with both copies renders the non-EMA UNet unless EMA is asked for, as diffusers'
/// `from_single_file`, A1111 and ComfyUI do; a file with only the EMA copy renders it.
#[test]
fn non_ema_weights_are_the_default() {
    let dir = tmp_dir("ema-default");
    let both = dir.join("both.safetensors");
    let ema_only = dir.join("ema-only.safetensors");
    let ema_name = |rest: &str| format!("model_ema.diffusion_model{}", rest.replace('.', ""));
    // The real UNet under the usual names, zeros as its EMA copy.
    rewrite(
        &single("tiny-sd1.safetensors"),
        &both,
        |name, t| match name.strip_prefix("model.diffusion_model.") {
            Some(rest) => vec![(ema_name(rest), t.zeros_like()), (name.to_string(), t)],
            None => vec![(name.to_string(), t)],
        },
        None,
    );
    rewrite(
        &single("tiny-sd1.safetensors"),
        &ema_only,
        |name, t| match name.strip_prefix("model.diffusion_model.") {
            Some(rest) => vec![(ema_name(rest), t)],
            None => vec![(name.to_string(), t)],
        },
        None,
    );
    assert!(!ModelOverrides::default().use_ema);
    // fp16, as the single file stores the weights: the folder's image is then the reference.
    let render = |path: &Path, use_ema: bool| {
        let overrides = ModelOverrides {
            use_ema,
            ..with_config("tiny-sd1")
        };
        let sd = StableDiffusion::load_with(path, &half(), &overrides)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        sd.generate(&txt2img_params(), None).unwrap().pixels
    };
    let folder = StableDiffusion::load(&fixtures().join("tiny-sd1"), &half())
        .unwrap()
        .generate(&txt2img_params(), None)
        .unwrap()
        .pixels;
    let by_default = render(&both, ModelOverrides::default().use_ema);
    assert!(
        max_abs_diff(&folder, &by_default) <= 1e-4,
        "default is not the non-EMA UNet"
    );
    let with_ema = render(&both, true);
    assert!(
        max_abs_diff(&folder, &with_ema) > 1e-2,
        "use_ema did not take the EMA copy"
    );
    let only = render(&ema_only, false);
    assert!(
        max_abs_diff(&folder, &only) <= 1e-4,
        "an EMA-only file must use its EMA copy"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn key_variants_load() {
    // `conditioner.embedders.0.transformer.*` (sgm-style) and no position_ids.
    let dir = tmp_dir("variants");
    let path = dir.join("sgm.safetensors");
    rewrite(
        &single("tiny-sd1.safetensors"),
        &path,
        |name, t| {
            if name.ends_with("position_ids") {
                return vec![];
            }
            match name.strip_prefix("cond_stage_model.") {
                Some(rest) => vec![(format!("conditioner.embedders.0.{rest}"), t)],
                None => vec![(name.to_string(), t)],
            }
        },
        None,
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let layout = Layout::detect(&ckpt, true).unwrap();
    assert_eq!(
        layout.text,
        TextLayout::Clip {
            prefix: "conditioner.embedders.0.transformer.text_model.".into()
        }
    );
    assert_same_vars(
        "sgm text encoder",
        &folder_vars("tiny-sd1", Part::Text),
        &source_vars(&ckpt, &layout, "tiny-sd1", Part::Text).unwrap(),
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn compressed_ckpt_entries_load() {
    use std::io::{Read, Write};
    let dir = tmp_dir("deflate");
    let path = dir.join("deflated.ckpt");
    let src = std::fs::File::open(single("tiny-sd1.ckpt")).unwrap();
    let mut archive = zip::ZipArchive::new(src).unwrap();
    let mut writer = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts =
        zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        writer.start_file(f.name(), opts).unwrap();
        writer.write_all(&data).unwrap();
    }
    writer.finish().unwrap();
    let a = Checkpoint::open(&single("tiny-sd1.ckpt")).unwrap();
    let b = Checkpoint::open(&path).unwrap();
    assert_eq!(a.len(), b.len());
    for name in [
        "first_stage_model.decoder.conv_in.weight",
        "model.diffusion_model.out.2.bias",
    ] {
        assert!(
            a.tensor(name).unwrap().equal(&b.tensor(name).unwrap()),
            "{name}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn txt2img_params() -> GenerateParams {
    GenerateParams {
        prompt: "a red circle on a white background".into(),
        negative_prompt: Some("blurry".into()),
        steps: 3,
        guidance: 5.0,
        seed: 7,
        width: Some(16),
        height: Some(16),
        ..Default::default()
    }
}

#[test]
fn same_images_as_the_folder() {
    for (file, model) in CASES {
        let folder = StableDiffusion::load(&fixtures().join(model), &half())
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        let one = StableDiffusion::load_with(&single(file), &half(), &with_config(model))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let params = if model.contains("inpaint") {
            let (w, h) = (16u32, 16u32);
            let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
            let mask: Vec<u8> = (0..w * h * 3)
                .map(|i| if (i / 3) % w < w / 2 { 255 } else { 0 })
                .collect();
            GenerateParams {
                init_image: Some(Image::new(w, h, rgb).unwrap()),
                mask: Some(Image::new(w, h, mask).unwrap()),
                ..txt2img_params()
            }
        } else {
            txt2img_params()
        };
        let a = folder
            .generate(&params, None)
            .unwrap_or_else(|e| panic!("{model}: {e}"));
        let b = one
            .generate(&params, None)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let err = max_abs_diff(&a.pixels, &b.pixels);
        eprintln!("{file}: image max abs difference to the folder {err:e}");
        assert!(
            err <= 1e-4,
            "{file}: image differs from the folder's by {err:e}"
        );
        let spread = a.pixels.std(false).double_value(&[]);
        assert!(spread > 1e-3, "{file}: flat image");
    }
}

#[test]
fn detected_configs_run_like_the_folder() {
    // tiny-sd1's UNet and VAE use what the SD 1.x defaults give for their shapes (8 heads, 32
    // groups), so without any config folder they compute what the folder's do.
    let _g = tch::no_grad_guard();
    let folder = StableDiffusion::load(&fixtures().join("tiny-sd1"), &half()).unwrap();
    let one = StableDiffusion::load(&single("tiny-sd1.safetensors"), &half()).unwrap();
    let sample = common::locked_randn(&[1, 4, 8, 8]).to_kind(Kind::Half);
    let ctx = common::locked_randn(&[1, 77, 32]).to_kind(Kind::Half);
    let a = folder.unet.forward(&sample, 311.0, &ctx).unwrap();
    let b = one.unet.forward(&sample, 311.0, &ctx).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let a = folder.vae.decode(&sample).unwrap();
    let b = one.vae.decode(&sample).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert_eq!(
        one.scheduler_config.class_name.as_deref(),
        Some("PNDMScheduler")
    );
}

#[test]
fn malicious_ckpt_is_refused_without_running() {
    let marker = Path::new("/tmp/stable-diffusion-malicious-ckpt-ran");
    let _ = std::fs::remove_file(marker);
    let path = single("malicious.ckpt");
    let err = match StableDiffusion::load(&path, &LoadOptions::default()) {
        Ok(_) => panic!("a malicious checkpoint loaded"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(
            "refusing to load posix.system from malicious.ckpt: only tensors and plain containers are allowed"
        ),
        "{err}"
    );
    let err = Checkpoint::open(&path).err().unwrap().to_string();
    assert!(err.contains("posix.system"), "{err}");
    assert!(!marker.exists(), "the payload ran");
}

#[test]
fn broken_and_unknown_files_are_clear_errors() {
    let dir = tmp_dir("broken");
    let load_err = |p: &Path| match StableDiffusion::load(p, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", p.display()),
        Err(e) => e.to_string(),
    };

    // Truncated files.
    for file in ["tiny-sd1.safetensors", "tiny-sd1.ckpt"] {
        let bytes = std::fs::read(single(file)).unwrap();
        let cut = dir.join(format!("cut-{file}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_err(&cut);
        assert!(err.contains(cut.to_str().unwrap()), "{err}");
        assert!(err.contains("truncated"), "{err}");
    }

    // Not a model at all.
    let junk = dir.join("junk.ckpt");
    std::fs::write(&junk, b"hello, not a checkpoint").unwrap();
    let err = load_err(&junk);
    assert!(
        err.contains("neither a .safetensors file nor a PyTorch zip"),
        "{err}"
    );

    // A safetensors file of something else: says what it found.
    let other = dir.join("other.safetensors");
    let t = Tensor::zeros([2, 2], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(
        &[("classifier.head.weight", &t), ("classifier.head.bias", &t)],
        &other,
    )
    .unwrap();
    let err = load_err(&other);
    assert!(
        err.contains("not an SD 1.x / 2.x / XL single-file checkpoint"),
        "{err}"
    );
    assert!(err.contains("no UNet"), "{err}");
    assert!(
        err.contains("found 2 tensors: classifier.head.* (2)"),
        "{err}"
    );

    // One diffusers component file: points at the folder instead.
    let err = load_err(
        &fixtures()
            .join("tiny-sd1")
            .join("unet")
            .join("diffusion_pytorch_model.safetensors"),
    );
    assert!(err.contains("diffusers folder"), "{err}");

    // A missing tensor is named by its original key.
    let missing = dir.join("missing.safetensors");
    rewrite(
        &single("tiny-sd1.safetensors"),
        &missing,
        |name, t| {
            if name == "first_stage_model.decoder.mid.attn_1.k.weight" {
                vec![]
            } else {
                vec![(name.to_string(), t)]
            }
        },
        None,
    );
    let err = match StableDiffusion::load_with(
        &missing,
        &LoadOptions::default(),
        &with_config("tiny-sd1"),
    ) {
        Ok(_) => panic!("loaded without a tensor"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("missing tensor `first_stage_model.decoder.mid.attn_1.k.weight`"),
        "{err}"
    );

    // A tensor of the wrong shape is named by its original key too.
    let bad = dir.join("bad.safetensors");
    rewrite(
        &single("tiny-sd1.safetensors"),
        &bad,
        |name, t| {
            if name == "model.diffusion_model.out.2.bias" {
                vec![(
                    name.to_string(),
                    Tensor::zeros([5], (Kind::Half, Device::Cpu)),
                )]
            } else {
                vec![(name.to_string(), t)]
            }
        },
        None,
    );
    let err =
        match StableDiffusion::load_with(&bad, &LoadOptions::default(), &with_config("tiny-sd1")) {
            Ok(_) => panic!("loaded a mis-shaped tensor"),
            Err(e) => e.to_string(),
        };
    assert!(
        err.contains("tensor `model.diffusion_model.out.2.bias` in")
            && err.contains("bad.safetensors has shape [5], expected [4]"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------------------------------
// SDXL
// ------------------------------------------------------------------------------------------

/// (file, folder it was written from, the file's dtype).
const SDXL_CASES: [(&str, &str, Kind); 4] = [
    ("tiny-sdxl.safetensors", "tiny-sdxl", Kind::Half),
    (
        "tiny-sdxl-refiner.safetensors",
        "tiny-sdxl-refiner",
        Kind::Half,
    ),
    (
        "tiny-sdxl-refiner-bf16.safetensors",
        "tiny-sdxl-refiner",
        Kind::BFloat16,
    ),
    ("tiny-sdxl-refiner.ckpt", "tiny-sdxl-refiner", Kind::Half),
];

fn sdxl_parts(model: &str) -> Vec<Part> {
    if fixtures().join(model).join("text_encoder").is_dir() {
        vec![Part::Text, Part::Text2, Part::Unet, Part::Vae]
    } else {
        vec![Part::Text, Part::Unet, Part::Vae]
    }
}

#[test]
fn every_sdxl_single_file_gives_the_folder_tensors() {
    for (file, model, stored) in SDXL_CASES {
        let ckpt = Checkpoint::open(&single(file)).unwrap();
        let layout = Layout::detect(&ckpt, false).unwrap();
        for part in sdxl_parts(model) {
            let got = source_vars(&ckpt, &layout, model, part)
                .unwrap_or_else(|e| panic!("{file} {part:?}: {e}"));
            assert_same_vars_in(
                &format!("{file} {part:?}"),
                &folder_vars(model, part),
                &got,
                stored,
            );
        }
    }
    // The .ckpt holds what the safetensors file holds.
    let st = Checkpoint::open(&single("tiny-sdxl-refiner.safetensors")).unwrap();
    let ck = Checkpoint::open(&single("tiny-sdxl-refiner.ckpt")).unwrap();
    assert_eq!(ck.global_step(), Some(20000));
    assert_eq!(st.len(), ck.len());
    for name in st.names() {
        let (x, y) = (st.tensor(name).unwrap(), ck.tensor(name).unwrap());
        assert!(x.kind() == y.kind() && x.equal(&y), "{name}");
    }
}

/// The sizes detected from an SDXL file are the folder's, wherever the shapes tell them.
fn assert_detected_like_the_folder(got: &SingleFileConfigs, model: &str) {
    let dir = fixtures().join(model);
    let unet = UNetConfig::from_file(&dir.join("unet/config.json")).unwrap();
    let n = unet.block_out_channels.len();
    let per = |v: &stable_diffusion::models::config::PerBlock<i64>| v.expand(n, "x").unwrap();
    assert_eq!(got.unet.in_channels, unet.in_channels, "{model}");
    assert_eq!(got.unet.out_channels, unet.out_channels, "{model}");
    assert_eq!(got.unet.block_out_channels, unet.block_out_channels);
    assert_eq!(per(&got.unet.layers_per_block), per(&unet.layers_per_block));
    assert_eq!(got.unet.down_block_types, unet.down_block_types, "{model}");
    assert_eq!(got.unet.up_block_types, unet.up_block_types, "{model}");
    assert_eq!(
        per(&got.unet.cross_attention_dim),
        per(&unet.cross_attention_dim)
    );
    assert_eq!(got.unet.use_linear_projection, unet.use_linear_projection);
    // Depths where there is attention, and the middle block's (the last level's).
    let (a, b) = (
        per(&got.unet.transformer_layers_per_block),
        per(&unet.transformer_layers_per_block),
    );
    for (i, kind) in unet.down_block_types.iter().enumerate() {
        if kind.starts_with("CrossAttn") || i + 1 == n {
            assert_eq!(a[i], b[i], "{model}: transformer depth of level {i}");
        }
    }
    assert_eq!(got.unet.addition_embed_type.as_deref(), Some("text_time"));
    assert_eq!(
        got.unet.addition_time_embed_dim,
        unet.addition_time_embed_dim
    );
    assert_eq!(
        got.unet.projection_class_embeddings_input_dim,
        unet.projection_class_embeddings_input_dim
    );
    let vae = VaeConfig::from_file(&dir.join("vae/config.json")).unwrap();
    assert_eq!(got.vae.block_out_channels, vae.block_out_channels);
    assert_eq!(got.vae.layers_per_block, vae.layers_per_block);
    assert_eq!(got.vae.latent_channels, vae.latent_channels);
    assert_eq!(got.vae.scaling_factor, 0.13025);
    assert_eq!(got.vae.scaling_factor, vae.scaling_factor);
    let mut texts = vec![(&got.text, text_dir(&dir, Part::Text))];
    if let Some(t) = &got.text_2 {
        texts.push((t, "text_encoder_2"));
    }
    for (t, sub) in texts {
        let want = ClipTextConfig::from_file(&dir.join(sub).join("config.json")).unwrap();
        assert_eq!(t.hidden_size, want.hidden_size, "{model} {sub}");
        assert_eq!(t.num_hidden_layers, want.num_hidden_layers, "{model} {sub}");
        assert_eq!(t.intermediate_size, want.intermediate_size, "{model} {sub}");
        assert_eq!(t.vocab_size, want.vocab_size, "{model} {sub}");
        assert_eq!(t.hidden_act, want.hidden_act, "{model} {sub}");
        assert_eq!(t.has_projection(), want.has_projection(), "{model} {sub}");
        if want.has_projection() {
            assert_eq!(t.projection_dim, want.projection_dim, "{model} {sub}");
        }
    }
    // SDXL's scheduler: the one tools/fixtures/sdxl.py took from the SDXL hub config.
    let sched = stable_diffusion::schedulers::SchedulerConfig::from_file(
        &dir.join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    assert_eq!(got.scheduler.class_name, sched.class_name);
    assert_eq!(got.scheduler.prediction_type, sched.prediction_type);
    assert_eq!(got.scheduler.beta_start, sched.beta_start);
    assert_eq!(got.scheduler.beta_end, sched.beta_end);
    assert_eq!(got.scheduler.beta_schedule, sched.beta_schedule);
    assert_eq!(got.scheduler.steps_offset, sched.steps_offset);
    assert_eq!(got.scheduler.timestep_spacing, sched.timestep_spacing);
}

#[test]
fn detects_sdxl_base_refiner_and_their_configs() {
    let base = Checkpoint::open(&single("tiny-sdxl.safetensors")).unwrap();
    let l = Layout::detect(&base, false).unwrap();
    assert_eq!((l.family, l.in_channels), (Family::Sdxl, 4));
    assert_eq!(
        l.text,
        TextLayout::Clip {
            prefix: "conditioner.embedders.0.transformer.text_model.".into()
        }
    );
    assert_eq!(
        l.text_2,
        Some(TextLayout::OpenClip {
            prefix: "conditioner.embedders.1.model.".into()
        })
    );
    assert_eq!(l.prediction_type, PredictionType::Epsilon);
    let got = SingleFileConfigs::infer(&base, &l).unwrap();
    assert_detected_like_the_folder(&got, "tiny-sdxl");
    let flags = got.sdxl.unwrap();
    assert!(!flags.refiner && flags.force_zeros_for_empty_prompt);
    assert!(!flags.requires_aesthetics_score);

    for file in [
        "tiny-sdxl-refiner.safetensors",
        "tiny-sdxl-refiner-bf16.safetensors",
        "tiny-sdxl-refiner.ckpt",
    ] {
        let ckpt = Checkpoint::open(&single(file)).unwrap();
        let l = Layout::detect(&ckpt, false).unwrap();
        assert_eq!(l.family, Family::SdxlRefiner, "{file}");
        assert_eq!(
            l.text,
            TextLayout::OpenClip {
                prefix: "conditioner.embedders.0.model.".into()
            }
        );
        assert_eq!(l.text_2, None);
        let got = SingleFileConfigs::infer(&ckpt, &l).unwrap();
        assert_detected_like_the_folder(&got, "tiny-sdxl-refiner");
        assert!(got.text_2.is_none());
        let flags = got.sdxl.unwrap();
        assert!(flags.refiner && flags.requires_aesthetics_score);
        assert!(!flags.force_zeros_for_empty_prompt);
    }
    assert_eq!(
        detect_format(&single("tiny-sdxl-refiner.ckpt")).unwrap(),
        ModelFormat::Ckpt
    );
}

/// A file rewritten from `src` (a safetensors fixture) in a fresh temporary folder.
fn rewritten(
    tag: &str,
    src: &str,
    f: impl Fn(&str, Tensor) -> Vec<(String, Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> (PathBuf, PathBuf) {
    let dir = tmp_dir(tag);
    let path = dir.join(format!("{tag}.safetensors"));
    rewrite(&single(src), &path, f, metadata);
    (dir, path)
}

#[test]
fn detects_sdxl_inpainting_v_prediction_and_sd2_saved_by_sgm() {
    // SDXL inpainting: the base's keys with a 9-channel conv_in (diffusers' `xl_inpaint`).
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    let (dir, path) = rewritten(
        "sdxl-inpaint",
        "tiny-sdxl.safetensors",
        |name, t| {
            if name == conv_in {
                let extra = t.narrow(1, 0, 4).zeros_like();
                let mask = t.narrow(1, 0, 1).zeros_like();
                vec![(name.to_string(), Tensor::cat(&[t, extra, mask], 1))]
            } else {
                vec![(name.to_string(), t)]
            }
        },
        None,
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let l = Layout::detect(&ckpt, false).unwrap();
    assert_eq!((l.family, l.in_channels), (Family::Sdxl, 9));
    assert!(l.is_inpainting());
    let configs = SingleFileConfigs::infer(&ckpt, &l).unwrap();
    assert_eq!(configs.unet.in_channels, 9);
    assert!(configs.sdxl.unwrap().force_zeros_for_empty_prompt);
    // It loads with the tiny folder's other configs, as a 9-channel SDXL pipeline.
    let cfg_dir = dir.join("config");
    common::copy_dir(&fixtures().join("tiny-sdxl"), &cfg_dir);
    let unet_cfg = cfg_dir.join("unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&unet_cfg).unwrap()).unwrap();
    json["in_channels"] = serde_json::json!(9);
    std::fs::write(&unet_cfg, json.to_string()).unwrap();
    let sd = StableDiffusion::load_with(
        &path,
        &LoadOptions::default(),
        &ModelOverrides {
            config_dir: Some(cfg_dir.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(sd.unet.in_channels(), 9);
    assert!(sd.sdxl.as_ref().unwrap().second.is_some());
    let _ = std::fs::remove_dir_all(dir);

    // v-prediction: ModelSpec metadata, or ComfyUI's `v_pred` key (with `ztsnr`: zero SNR).
    let (dir, path) = rewritten(
        "sdxl-v-meta",
        "tiny-sdxl.safetensors",
        |name, t| vec![(name.to_string(), t)],
        Some(HashMap::from([(
            "modelspec.prediction_type".to_string(),
            "v".to_string(),
        )])),
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let l = Layout::detect(&ckpt, false).unwrap();
    assert_eq!(l.prediction_type, PredictionType::VPrediction);
    assert!(!l.zero_terminal_snr);
    let s = SingleFileConfigs::default_scheduler(&l).unwrap();
    assert_eq!(s.class_name.as_deref(), Some("EulerDiscreteScheduler"));
    assert_eq!(s.prediction_type, Some(PredictionType::VPrediction));
    assert_eq!(s.rescale_betas_zero_snr, None);
    let _ = std::fs::remove_dir_all(dir);
    let (dir, path) = rewritten(
        "sdxl-v-key",
        "tiny-sdxl-refiner.safetensors",
        |name, t| {
            let mut out = vec![(name.to_string(), t)];
            if name == conv_in {
                let empty = Tensor::zeros([0], (Kind::Float, Device::Cpu));
                out.push(("v_pred".to_string(), empty.shallow_clone()));
                out.push(("ztsnr".to_string(), empty));
            }
            out
        },
        None,
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let l = Layout::detect(&ckpt, false).unwrap();
    assert_eq!(l.family, Family::SdxlRefiner);
    assert_eq!(l.prediction_type, PredictionType::VPrediction);
    assert!(l.zero_terminal_snr);
    let s = SingleFileConfigs::default_scheduler(&l).unwrap();
    assert_eq!(s.prediction_type, Some(PredictionType::VPrediction));
    assert_eq!(s.rescale_betas_zero_snr, Some(true));
    let sd = StableDiffusion::load_with(
        &path,
        &LoadOptions::default(),
        &with_config("tiny-sdxl-refiner"),
    )
    .unwrap();
    // A config folder's scheduler wins over what the file says, as in diffusers.
    assert_eq!(
        sd.scheduler_config.prediction_type,
        Some(PredictionType::Epsilon)
    );
    let _ = std::fs::remove_dir_all(dir);

    // SD 2.x saved by sgm has `conditioner.embedders.0.model.*` too, over a UNet without
    // added conditions: SD 2.x, not the refiner.
    let (dir, path) = rewritten(
        "sd2-sgm",
        "tiny-sd2.safetensors",
        |name, t| match name.strip_prefix("cond_stage_model.") {
            Some(rest) => vec![(format!("conditioner.embedders.0.{rest}"), t)],
            None => vec![(name.to_string(), t)],
        },
        None,
    );
    let ckpt = Checkpoint::open(&path).unwrap();
    let l = Layout::detect(&ckpt, false).unwrap();
    assert_eq!(l.family, Family::Sd2);
    assert_same_vars(
        "SD 2.x saved by sgm",
        &folder_vars("tiny-sd2", Part::Text),
        &source_vars(&ckpt, &l, "tiny-sd2", Part::Text).unwrap(),
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn refiner_params() -> GenerateParams {
    let (w, h) = (32u32, 32u32);
    let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 37 % 251) as u8).collect();
    GenerateParams {
        prompt: "a green box in a sunny room".into(),
        steps: 4,
        guidance: 5.0,
        seed: 11,
        strength: Some(0.6),
        init_image: Some(Image::new(w, h, rgb).unwrap()),
        ..Default::default()
    }
}

/// Inpainting a 32x32 image inside a rectangle, at strength 1 (the 9-channel UNet's own case).
fn inpaint_params() -> GenerateParams {
    let (w, h) = (32u32, 32u32);
    let inside = |i: u32| (6..22).contains(&(i % w)) && (4..26).contains(&(i / w));
    let mask: Vec<u8> = (0..w * h)
        .flat_map(|i| [if inside(i) { 255 } else { 0 }; 3])
        .collect();
    GenerateParams {
        prompt: "a stone bridge".into(),
        strength: Some(1.0),
        mask: Some(Image::new(w, h, mask).unwrap()),
        ..refiner_params()
    }
}

fn base_params() -> GenerateParams {
    GenerateParams {
        prompt: "a red circle on a white background".into(),
        prompt_2: Some("oil on canvas!".into()),
        negative_prompt: None,
        steps: 3,
        guidance: 5.0,
        seed: 7,
        width: Some(32),
        height: Some(32),
        ..Default::default()
    }
}

/// The single files with `config_dir` = their folder make the folder's images, both models
/// held in the file's dtype (where their weights are the same numbers): the base's txt2img
/// (zeroed negative, a second prompt), the refiner's img2img (aesthetic-score time ids), the
/// 9-channel inpainting model's inpainting (masked image latents and mask as UNet inputs).
#[test]
fn sdxl_single_files_make_the_folders_images() {
    for (file, model, stored) in [
        ("tiny-sdxl.safetensors", "tiny-sdxl", Kind::Half),
        (
            "tiny-sdxl-inpaint.safetensors",
            "tiny-sdxl-inpaint",
            Kind::Half,
        ),
        (
            "tiny-sdxl-refiner-bf16.safetensors",
            "tiny-sdxl-refiner",
            Kind::BFloat16,
        ),
        ("tiny-sdxl-refiner.ckpt", "tiny-sdxl-refiner", Kind::Half),
    ] {
        let options = LoadOptions {
            kind: stored,
            ..Default::default()
        };
        // A float16 SDXL pipeline would run its VAE in float32 (force_upcast), from the
        // folder's exact weights but from the file's float16 rounding: a copy of the folder
        // without the flag keeps both VAEs in the file's dtype, where the weights are equal.
        let dir = tmp_dir(&format!("no-upcast-{model}"));
        common::copy_dir(&fixtures().join(model), &dir);
        let vae_config = dir.join("vae/config.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&vae_config).unwrap()).unwrap();
        json["force_upcast"] = serde_json::json!(false);
        std::fs::write(&vae_config, json.to_string()).unwrap();
        // A float32 folder loaded in place in bf16 keeps its text encoders in float32: the
        // copied folder holds them, like the file, in bf16.
        let folder_options = LoadOptions {
            copy_weights: true,
            ..options.clone()
        };
        let folder =
            StableDiffusion::load(&dir, &folder_options).unwrap_or_else(|e| panic!("{model}: {e}"));
        let overrides = ModelOverrides {
            config_dir: Some(dir.clone()),
            ..Default::default()
        };
        let one = StableDiffusion::load_with(&single(file), &options, &overrides)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let (f, o) = (folder.sdxl.as_ref().unwrap(), one.sdxl.as_ref().unwrap());
        assert_eq!(f.second.is_some(), o.second.is_some(), "{file}");
        assert_eq!(
            f.force_zeros_for_empty_prompt,
            o.force_zeros_for_empty_prompt
        );
        assert_eq!(f.requires_aesthetics_score, o.requires_aesthetics_score);
        let params = if model.contains("refiner") {
            refiner_params()
        } else if model.contains("inpaint") {
            assert_eq!(one.unet.in_channels(), 9, "{file}");
            inpaint_params()
        } else {
            base_params()
        };
        let a = folder.generate(&params, None).unwrap();
        let b = one.generate(&params, None).unwrap();
        let err = max_abs_diff(&a.pixels, &b.pixels);
        eprintln!("{file}: image max abs difference to the folder {err:e}");
        assert!(err <= 1e-4, "{file}: image differs by {err:e}");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(a.pixels.std(false).double_value(&[]) > 1e-3, "{file}: flat");
    }
}

/// `config_dir` supplies tokenizer_2/ (checked against transformers' ids of the fixture) and
/// model_index.json's flags; without one, an SDXL file gets the family's defaults.
#[test]
fn sdxl_config_folder_supplies_tokenizers_and_flags() {
    let refs = common::Refs::open("tiny-sdxl");
    let prompts = common::cases("tiny-sdxl")["text_prompts"].clone();
    let prompt = prompts[0].as_str().unwrap();
    let sd = StableDiffusion::load_with(
        &single("tiny-sdxl.safetensors"),
        &LoadOptions::default(),
        &with_config("tiny-sdxl"),
    )
    .unwrap();
    let want: Vec<i64> = Vec::try_from(refs.get("text_ids").get(0)).unwrap();
    assert_eq!(sd.tokenizer.encode_padded(prompt), want);
    let (tokenizer_2, _) = sd.sdxl.as_ref().unwrap().second.as_ref().unwrap();
    let want: Vec<i64> = Vec::try_from(refs.get("text_ids_2").get(0)).unwrap();
    assert_eq!(tokenizer_2.encode_padded(prompt), want);
    // The refiner's only tokenizer is tokenizer_2/ (pad "!", id 0).
    let refiner = StableDiffusion::load_with(
        &single("tiny-sdxl-refiner.safetensors"),
        &LoadOptions::default(),
        &with_config("tiny-sdxl-refiner"),
    )
    .unwrap();
    assert_eq!(refiner.tokenizer.encode_padded(prompt), want);
    assert_eq!(refiner.tokenizer.pad_id(), 0);

    // model_index.json's flags are read from the config folder.
    let dir = tmp_dir("sdxl-flags");
    let cfg = dir.join("config");
    common::copy_dir(&fixtures().join("tiny-sdxl"), &cfg);
    let index = cfg.join("model_index.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    json["force_zeros_for_empty_prompt"] = serde_json::json!(false);
    std::fs::write(&index, json.to_string()).unwrap();
    let overrides = ModelOverrides {
        config_dir: Some(cfg.clone()),
        ..Default::default()
    };
    let sd = StableDiffusion::load_with(
        &single("tiny-sdxl.safetensors"),
        &LoadOptions::default(),
        &overrides,
    )
    .unwrap();
    assert!(!sd.sdxl.as_ref().unwrap().force_zeros_for_empty_prompt);
    json["requires_aesthetics_score"] = serde_json::json!(true);
    std::fs::write(&index, json.to_string()).unwrap();
    let err = common::err_text(StableDiffusion::load_with(
        &single("tiny-sdxl.safetensors"),
        &LoadOptions::default(),
        &overrides,
    ));
    assert!(err.contains("requires_aesthetics_score"), "{err}");
    // A config folder without text_encoder_2/ cannot describe an SDXL file.
    std::fs::remove_dir_all(cfg.join("text_encoder_2")).unwrap();
    let err = common::err_text(StableDiffusion::load_with(
        &single("tiny-sdxl.safetensors"),
        &LoadOptions::default(),
        &overrides,
    ));
    assert!(err.contains("text_encoder_2"), "{err}");
    let _ = std::fs::remove_dir_all(dir);

    // Without a config folder the tiny files' group norms (8 groups) are not what SDXL uses
    // (32) and nothing in the shapes says so: a clear error, not a wrong model. (The detected
    // sizes are checked against the folders with `SingleFileConfigs::infer`.)
    let err = common::err_text(StableDiffusion::load(
        &single("tiny-sdxl.safetensors"),
        &LoadOptions::default(),
    ));
    assert!(
        err.contains("16 channels") && err.contains("32 groups"),
        "{err}"
    );
}

/// A rewrite that drops `key`.
fn without(key: &'static str) -> impl Fn(&str, Tensor) -> Vec<(String, Tensor)> {
    move |name, t| {
        if name == key {
            vec![]
        } else {
            vec![(name.to_string(), t)]
        }
    }
}

/// A rewrite that stores zeros of `shape` as `key`.
fn replaced(
    key: &'static str,
    shape: &'static [i64],
) -> impl Fn(&str, Tensor) -> Vec<(String, Tensor)> {
    move |name, t| {
        if name == key {
            vec![(
                name.to_string(),
                Tensor::zeros(shape, (Kind::Half, Device::Cpu)),
            )]
        } else {
            vec![(name.to_string(), t)]
        }
    }
}

#[test]
fn broken_sdxl_files_name_the_tensor_at_fault() {
    let load = |path: &Path, model: &str| {
        common::err_text(StableDiffusion::load_with(
            path,
            &LoadOptions::default(),
            &with_config(model),
        ))
    };
    let detect = |path: &Path| {
        let ckpt = Checkpoint::open(path).unwrap();
        let layout = Layout::detect(&ckpt, false)?;
        SingleFileConfigs::infer(&ckpt, &layout).map(|_| ())
    };

    // The second encoder's projection missing: named with and without a config folder.
    let proj = "conditioner.embedders.1.model.text_projection";
    let (dir, path) = rewritten("no-proj", "tiny-sdxl.safetensors", without(proj), None);
    let err = load(&path, "tiny-sdxl");
    assert!(err.contains(&format!("missing tensor `{proj}")), "{err}");
    let err = common::err_text(detect(&path));
    assert!(err.contains(proj), "{err}");
    let _ = std::fs::remove_dir_all(dir);

    // A mis-shaped fused in_proj of the second encoder.
    let in_proj = "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight";
    let (dir, path) = rewritten(
        "bad-in-proj",
        "tiny-sdxl.safetensors",
        replaced(in_proj, &[95, 32]),
        None,
    );
    let err = load(&path, "tiny-sdxl");
    assert!(err.contains(in_proj) && err.contains("[95, 32]"), "{err}");
    let _ = std::fs::remove_dir_all(dir);

    // A projection of another width: the config folder's shape check names it; detection
    // finds that the pooled text no longer fits the UNet's label_emb.
    let (dir, path) = rewritten(
        "narrow-proj",
        "tiny-sdxl.safetensors",
        replaced(proj, &[32, 16]),
        None,
    );
    let err = load(&path, "tiny-sdxl");
    assert!(
        err.contains(&format!("{proj} (transposed")) && err.contains("shape [16, 32]"),
        "{err}"
    );
    let err = common::err_text(detect(&path));
    assert!(
        err.contains("model.diffusion_model.label_emb.0.0.weight") && err.contains(proj),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);

    // The refiner's bigG projection stored for another width than the encoder's.
    let refiner_proj = "conditioner.embedders.0.model.text_projection";
    let (dir, path) = rewritten(
        "refiner-proj",
        "tiny-sdxl-refiner.safetensors",
        replaced(refiner_proj, &[16, 32]),
        None,
    );
    let err = common::err_text(detect(&path));
    assert!(
        err.contains(refiner_proj) && err.contains("[16, 32]"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);

    // The UNet's added-condition MLP missing.
    let label = "model.diffusion_model.label_emb.0.2.weight";
    let (dir, path) = rewritten("no-label", "tiny-sdxl.safetensors", without(label), None);
    let err = load(&path, "tiny-sdxl");
    assert!(err.contains(&format!("missing tensor `{label}")), "{err}");
    let _ = std::fs::remove_dir_all(dir);

    // The base without its first encoder.
    let (dir, path) = rewritten(
        "no-clip-l",
        "tiny-sdxl.safetensors",
        |name, t| {
            if name.starts_with("conditioner.embedders.0.") {
                vec![]
            } else {
                vec![(name.to_string(), t)]
            }
        },
        None,
    );
    let err = common::err_text(detect(&path));
    assert!(
        err.contains("conditioner.embedders.0.transformer.text_model"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);

    // Up blocks deeper than their level: diffusers' UNet cannot hold it, and we say so.
    let (dir, path) = rewritten(
        "deep-up",
        "tiny-sdxl.safetensors",
        |name, t| {
            let mut out = vec![(name.to_string(), t.shallow_clone())];
            let prefix = "model.diffusion_model.output_blocks.0.1.transformer_blocks.1.";
            if let Some(rest) = name.strip_prefix(prefix) {
                out.push((
                    format!("model.diffusion_model.output_blocks.0.1.transformer_blocks.2.{rest}"),
                    t,
                ));
            }
            out
        },
        None,
    );
    let err = common::err_text(detect(&path));
    assert!(
        err.contains("output_blocks.0.1.proj_in.weight") && err.contains("3 transformer layers"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
