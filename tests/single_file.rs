//! Single-file checkpoints in the original CompVis / A1111 layout (tests/fixtures/single/, made
//! by tools/fixtures/single_file.py from the tiny diffusers folders and checked there with
//! diffusers' own `from_single_file`): every loading path gives the folder's tensors and
//! images; family, prediction type and configs are detected from the file; EMA weights and the
//! known key variants load; a malicious pickle is refused without running; broken and unknown
//! files give clear errors.
//!
//! The single files store float16 (as "pruned fp16" downloads do), so tensors are compared
//! with the folder's rounded to float16 (max abs 0), and images are compared with both models
//! held in float16, where their weights are identical.
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

/// The three models of a folder: (folder-loaded, single-file-loaded) variables, both fp32.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Part {
    Text,
    Unet,
    Vae,
}

fn build(part: Part, folder: &Path, vs: &VarStore) {
    match part {
        Part::Text => {
            let c = ClipTextConfig::from_file(&folder.join("text_encoder/config.json")).unwrap();
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
        Part::Text => ("text_encoder", "model"),
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
    assert_eq!(folder.len(), got.len(), "{what}: variable count");
    let mut nonzero = 0;
    for (name, expected) in folder {
        let actual = got.get(name).unwrap_or_else(|| panic!("{what}: no {name}"));
        let expected = expected.to_kind(Kind::Half).to_kind(Kind::Float);
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
        err.contains("not an SD 1.x / 2.x single-file checkpoint"),
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
