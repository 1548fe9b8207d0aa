//! Weight loading: errors that name the tensor, dtype conversion, and user files left untouched.
mod common;

use common::{copy_dir, fixtures, Pick, Refs};
use stable_diffusion::models::bf16_cpu;
use stable_diffusion::pipeline::{LoadOptions, StableDiffusion, WeightKernels};
use stable_diffusion::weights::single_file::ModelOverrides;
use stable_diffusion::Error;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A scratch copy of a fixture model whose UNet file the test may rewrite.
struct ScratchModel {
    root: PathBuf,
}

impl ScratchModel {
    fn new(model: &str, tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("sd-weights-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        copy_dir(&fixtures().join(model), &root);
        Self { root }
    }

    fn unet_file(&self) -> PathBuf {
        self.root
            .join("unet")
            .join("diffusion_pytorch_model.safetensors")
    }

    /// Rewrites the UNet weights through `edit`.
    fn edit_unet(&self, edit: impl Fn(Vec<(String, Tensor)>) -> Vec<(String, Tensor)>) {
        let tensors = Tensor::read_safetensors(self.unet_file()).unwrap();
        Tensor::write_safetensors(&edit(tensors), self.unet_file()).unwrap();
    }
}

impl ScratchModel {
    /// Widens the text encoder's MLP to `intermediate` (seeded weights, config to match), so
    /// that its layers span many pages and packing pays for them.
    fn widen_text_encoder(&self, intermediate: i64, seed: u64) {
        let dir = self.root.join("text_encoder");
        let file = dir.join("model.safetensors");
        let mut rng = common::Rng::new(seed);
        let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
            .unwrap()
            .into_iter()
            .map(|(name, t)| {
                let shape = match (name.contains(".mlp.fc1."), name.contains(".mlp.fc2.")) {
                    (true, _) if t.dim() == 2 => vec![intermediate, t.size()[1]],
                    (true, _) => vec![intermediate],
                    (_, true) if t.dim() == 2 => vec![t.size()[0], intermediate],
                    _ => return (name, t),
                };
                let n: i64 = shape.iter().product();
                let phase = rng.below(1000) as f64;
                let values = (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.37 + phase)
                    .sin()
                    * 0.05;
                (name, values.view(shape.as_slice()))
            })
            .collect();
        Tensor::write_safetensors(&tensors, &file).unwrap();
        let config_path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config["intermediate_size"] = intermediate.into();
        std::fs::write(&config_path, config.to_string()).unwrap();
    }
}

impl Drop for ScratchModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn missing_tensor_is_named() {
    let m = ScratchModel::new("tiny-sd1", "missing");
    m.edit_unet(|t| {
        t.into_iter()
            .filter(|(n, _)| n != "mid_block.attentions.0.proj_in.weight")
            .collect()
    });
    let err = StableDiffusion::load(&m.root, &LoadOptions::default())
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::MissingTensor { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("mid_block.attentions.0.proj_in.weight"),
        "{msg}"
    );
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let m = ScratchModel::new("tiny-sd1", "shape");
    m.edit_unet(|t| {
        t.into_iter()
            .map(|(n, x)| {
                if n == "conv_out.bias" {
                    (n, Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)))
                } else {
                    (n, x)
                }
            })
            .collect()
    });
    let err = StableDiffusion::load(&m.root, &LoadOptions::default())
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains("conv_out.bias") && msg.contains("[5]") && msg.contains("[4]"),
        "{msg}"
    );
}

#[test]
fn missing_weights_file_and_config_are_named() {
    let m = ScratchModel::new("tiny-sd1", "nofile");
    std::fs::remove_file(m.unet_file()).unwrap();
    let msg = StableDiffusion::load(&m.root, &LoadOptions::default())
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors") && msg.contains("unet"),
        "{msg}"
    );

    let m = ScratchModel::new("tiny-sd1", "noconfig");
    std::fs::remove_file(m.root.join("vae").join("config.json")).unwrap();
    let msg = StableDiffusion::load(&m.root, &LoadOptions::default())
        .err()
        .expect("must fail")
        .to_string();
    assert!(msg.contains("vae") && msg.contains("config.json"), "{msg}");
}

#[test]
fn truncated_file_is_an_error_not_a_crash() {
    let m = ScratchModel::new("tiny-sd1", "truncated");
    let bytes = std::fs::read(m.unet_file()).unwrap();
    std::fs::write(m.unet_file(), &bytes[..bytes.len() / 2]).unwrap();
    let msg = StableDiffusion::load(&m.root, &LoadOptions::default())
        .err()
        .expect("must fail")
        .to_string();
    assert!(msg.contains("diffusion_pytorch_model.safetensors"), "{msg}");
}

#[test]
fn loading_leaves_the_files_untouched() {
    let dir = fixtures().join("tiny-sd2");
    let file = dir
        .join("unet")
        .join("diffusion_pytorch_model.fp16.safetensors");
    let before = std::fs::read(&file).unwrap();
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    let sd = StableDiffusion::load(&dir, &LoadOptions::default()).unwrap();
    drop(sd);
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        modified
    );
}

#[test]
fn bf16_weights_run_on_cpu() {
    // The fp16 UNet file of tiny-sd2, held and run in bf16: close to the fp32 reference within
    // bf16's precision (8 bits of mantissa).
    let _g = tch::no_grad_guard();
    let options = LoadOptions {
        kind: Kind::BFloat16,
        ..Default::default()
    };
    let sd = StableDiffusion::load(&fixtures().join("tiny-sd2"), &options).unwrap();
    let refs = Refs::open("tiny-sd2");
    // This CPU's own bf16 kernels, then products widened to float32 as on a CPU without fast
    // bf16 kernels (the same path twice where this CPU has none).
    for widen in [false, true] {
        let _widen = widen.then(bf16_cpu::force_widening);
        let out = sd
            .unet
            .forward(
                &refs.get("unet_sample").to_kind(Kind::BFloat16),
                537.0,
                &refs.get("unet_ehs").to_kind(Kind::BFloat16),
            )
            .unwrap();
        assert_eq!(out.kind(), Kind::BFloat16);
        let expected = refs.get("unet_out");
        let err = common::max_abs_diff(&out.to_kind(Kind::Float), &expected);
        let scale = expected.abs().max().double_value(&[]);
        eprintln!("bf16 UNet (widened: {widen}): max abs error {err:.3e} of {scale:.3}");
        assert!(err < 0.05 * scale, "bf16 UNet error {err} too large");
    }
}

#[test]
fn bf16_layers_widened_to_float32() {
    // Seeded shapes of linear and convolution layers held in bf16, run with their products
    // widened to float32: the result must be the float32 product of the same bf16 values,
    // rounded to bf16 (float32 holds every bf16 value exactly), and agree with libtorch's own
    // bf16 kernels to bf16's precision.
    use stable_diffusion::models::blocks::{Conv2d, Linear};
    let _g = tch::no_grad_guard();
    let _widen = bf16_cpu::force_widening();
    let mut rng = common::Rng::new(0x5eed_bf16);
    let close = |got: &Tensor, native: &Tensor, what: &str| {
        let scale = native
            .to_kind(Kind::Float)
            .abs()
            .max()
            .double_value(&[])
            .max(1e-3);
        let err = common::max_abs_diff(&got.to_kind(Kind::Float), &native.to_kind(Kind::Float));
        assert!(
            err <= 0.02 * scale,
            "{what}: {err} against libtorch's bf16 ({scale})"
        );
    };
    for case in 0..12 {
        tch::manual_seed(case);
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let (batch, bias) = (1 + rng.below(2) as i64, rng.below(2) == 0);
        let (inp, out) = (1 + rng.below(48) as i64, 1 + rng.below(48) as i64);

        let tokens = 1 + rng.below(20) as i64;
        let mut linear = Linear::new(vs.root() / "l", inp, out, bias);
        linear.weight = linear.weight.to_kind(Kind::BFloat16);
        linear.bias = linear.bias.map(|b| (b + 0.1).to_kind(Kind::BFloat16));
        let xs = Tensor::randn([batch, tokens, inp], (Kind::BFloat16, tch::Device::Cpu));
        let got = linear.forward(&xs).unwrap();
        assert_eq!(got.kind(), Kind::BFloat16, "case {case}");
        let wide = |t: &Tensor| t.to_kind(Kind::Float);
        let expected = wide(&xs)
            .linear(
                &wide(&linear.weight),
                linear.bias.as_ref().map(wide).as_ref(),
            )
            .to_kind(Kind::BFloat16);
        assert!(got.equal(&expected), "case {case}: linear {inp}->{out}");
        close(
            &got,
            &xs.linear(&linear.weight, linear.bias.as_ref()),
            "linear",
        );

        let kernel = [1, 3][rng.below(2)];
        let stride = 1 + rng.below(2) as i64;
        let padding = kernel / 2;
        let (c_in, c_out) = (1 + rng.below(16) as i64, 1 + rng.below(16) as i64);
        let side = 2 + rng.below(10) as i64;
        let mut conv =
            Conv2d::with_bias(vs.root() / "c", c_in, c_out, kernel, stride, padding, bias);
        conv.weight = conv.weight.to_kind(Kind::BFloat16);
        conv.bias = conv.bias.map(|b| (b - 0.1).to_kind(Kind::BFloat16));
        let xs = Tensor::randn(
            [batch, c_in, side, side],
            (Kind::BFloat16, tch::Device::Cpu),
        );
        let got = conv.forward(&xs).unwrap();
        assert_eq!(got.kind(), Kind::BFloat16, "case {case}");
        let conv_of = |xs: &Tensor, w: &Tensor, b: Option<&Tensor>| {
            xs.conv2d(w, b, [stride, stride], [padding, padding], [1, 1], 1)
        };
        let expected = conv_of(
            &wide(&xs),
            &wide(&conv.weight),
            conv.bias.as_ref().map(wide).as_ref(),
        )
        .to_kind(Kind::BFloat16);
        assert!(
            got.equal(&expected),
            "case {case}: conv {c_in}->{c_out} k{kernel} s{stride}"
        );
        close(
            &got,
            &conv_of(&xs, &conv.weight, conv.bias.as_ref()),
            "conv",
        );
    }
}

/// Resident bytes (`Rss:` of /proc/self/smaps) of this process's mappings of `path`.
fn mapped_rss_bytes(path: &Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let wanted = path.to_str().unwrap();
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.trim_end().ends_with(wanted);
        } else if inside {
            if let Some(kb) = line.strip_prefix("Rss:") {
                total += kb
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
                    * 1024;
            }
        }
    }
    total
}

/// Weights are copied into the model one tensor at a time and each tensor's pages of the
/// memory-mapped file are let go once copied: a loaded model is not resident twice. Checked on
/// files of seeded sizes and dtypes (stored as the model's dtype, and converted), with the
/// file still open, on the mapping's own resident size.
#[test]
fn loaded_weights_leave_the_file_pages() {
    use stable_diffusion::weights::WeightSet;
    let dir = std::env::temp_dir().join(format!("sd-weights-rss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = common::Rng::new(11);
    for case in 0..4 {
        let dtype = ["F32", "F16"][case % 2];
        let mut tensors = Vec::new();
        let mut shapes = Vec::new();
        let mut total = 0;
        for i in 0..(2 + rng.below(3)) {
            // 1-8 MiB tensors, plus one small one that stays mapped.
            let shape = vec![256 * (1 + rng.below(8) as i64), 1024];
            let bytes = (shape[0] * shape[1]) as usize * common::dtype_size(dtype);
            let data: Vec<u8> = (0..bytes).map(|_| rng.next_u64() as u8 & 0x3b).collect();
            total += bytes;
            let stored_shape = shape.iter().map(|&d| d as u64).collect();
            tensors.push((format!("w{i}"), dtype.to_string(), stored_shape, data));
            shapes.push((format!("w{i}"), shape));
        }
        tensors.push((
            "small".into(),
            dtype.into(),
            vec![16],
            vec![0; 16 * common::dtype_size(dtype)],
        ));
        shapes.push(("small".into(), vec![16]));
        let path = dir.join(format!("case{case}.safetensors"));
        std::fs::write(&path, common::write_safetensors(&tensors)).unwrap();

        let weights = WeightSet::open(&[path.clone()]).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        for (name, shape) in &shapes {
            let _ = vs.root().zeros(name, shape);
        }
        weights.load_into(&vs).unwrap();
        let resident = mapped_rss_bytes(&path);
        assert!(
            resident <= 64 << 10,
            "case {case} ({dtype}): {resident} bytes of the {total}-byte file still resident after loading"
        );
        // The copy is whole: every variable holds the file's values.
        for (name, shape) in &shapes {
            let stored = weights.files()[0]
                .tensor(name)
                .unwrap()
                .to_kind(Kind::Float);
            let held = &vs.variables()[name];
            assert_eq!(held.size(), *shape);
            assert!(
                held.equal(&stored),
                "case {case}: {name} differs from the file"
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Weights used in place: for seeded files of mixed dtypes and shapes, with headers of every
/// length modulo 8 (so tensors start at every alignment), a matrix or convolution kernel (2-D or
/// 4-D) whose dtype matches and whose bytes are aligned points into the file's map, any other
/// tensor is copied, and every one holds
/// exactly the stored values. Writing every variable then changes neither the file nor any
/// other variable (the map is private, copy-on-write, page by page).
#[test]
fn mapped_weights_equal_the_file_and_never_write_it() {
    use stable_diffusion::weights::{load_into_mapped, WeightSet};
    let _g = tch::no_grad_guard();
    let dir = std::env::temp_dir().join(format!("sd-weights-map-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = common::Rng::new(23);
    let kinds = [
        ("F32", Kind::Float),
        ("F16", Kind::Half),
        ("BF16", Kind::BFloat16),
    ];
    let mut mapped_total = 0;
    for case in 0..24 {
        let mut tensors = Vec::new();
        let mut wanted = Vec::new();
        for i in 0..(3 + rng.below(5)) {
            let (dtype, stored) = kinds[rng.below(kinds.len())];
            let dims = 1 + rng.below(4);
            let shape: Vec<i64> = (0..dims)
                .map(|_| 1 + rng.below(if dims == 4 { 12 } else { 40 }) as i64)
                .collect();
            let numel: i64 = shape.iter().product();
            let values = Tensor::from_slice(
                &(0..numel)
                    .map(|_| rng.below(2000) as f32 / 64.0 - 15.0)
                    .collect::<Vec<_>>(),
            )
            .to_kind(stored)
            .reshape(shape.as_slice());
            let mut bytes = vec![0u8; numel as usize * common::dtype_size(dtype)];
            values.copy_data_u8(&mut bytes, numel as usize);
            // The model asks for the stored dtype two times in three.
            let kind = if rng.below(3) < 2 {
                stored
            } else {
                kinds[rng.below(3)].1
            };
            let name = format!("t{i}");
            tensors.push((
                name.clone(),
                dtype.to_string(),
                shape.iter().map(|&d| d as u64).collect(),
                bytes,
            ));
            wanted.push((name, shape, values, kind));
        }
        let mut file = common::write_safetensors(&tensors);
        // Pad the header with spaces (valid JSON) to a length of every residue modulo 8.
        let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let pad = case % 8;
        file.splice(
            8 + header_len..8 + header_len,
            std::iter::repeat(b' ').take(pad),
        );
        file[..8].copy_from_slice(&((header_len + pad) as u64).to_le_bytes());
        let path = dir.join(format!("case{case}.safetensors"));
        std::fs::write(&path, &file).unwrap();

        let weights = WeightSet::open(&[path.clone()]).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let mut vars = Vec::new();
        for (name, shape, _, kind) in &wanted {
            vars.push(vs.root().add(
                name,
                Tensor::zeros(shape.as_slice(), (*kind, tch::Device::Cpu)),
                false,
            ));
        }
        let owners = load_into_mapped(&weights, &vs, |n| vec![n.to_string()], true).unwrap();
        let map = std::fs::read_to_string("/proc/self/maps").unwrap();
        let in_map = |t: &Tensor| {
            let p = t.data_ptr() as usize;
            map.lines()
                .filter(|l| l.trim_end().ends_with(path.to_str().unwrap()))
                .any(|l| {
                    let range = l.split_whitespace().next().unwrap();
                    let (a, b) = range.split_once('-').unwrap();
                    let (a, b) = (
                        usize::from_str_radix(a, 16).unwrap(),
                        usize::from_str_radix(b, 16).unwrap(),
                    );
                    (a..b).contains(&p)
                })
        };
        for ((name, _, values, kind), var) in wanted.iter().zip(&vars) {
            let info = weights.files()[0].info(name).unwrap();
            let stored = stable_diffusion::weights::safetensors_file::kind_of(info.dtype).unwrap();
            let offset = info.offset();
            let aligned = offset % stored.elt_size_in_bytes() == 0;
            // Only matrices and convolution kernels (2-D, 4-D) are worth using in place.
            let packable = matches!(info.shape.len(), 2 | 4);
            assert_eq!(
                in_map(var),
                stored == *kind && aligned && packable,
                "case {case} {name}: {stored:?} at offset {offset} into a {kind:?} variable"
            );
            mapped_total += in_map(var) as usize;
            assert_eq!(var.kind(), *kind);
            assert!(
                var.to_kind(Kind::Double)
                    .equal(&values.to_kind(*kind).to_kind(Kind::Double)),
                "case {case} {name}: {stored:?} into {kind:?}, mapped {}",
                in_map(var)
            );
        }
        assert_eq!(
            owners.len(),
            vars.iter().any(|v| in_map(v)) as usize,
            "case {case}"
        );
        // Writes stay ours: the file is unchanged and each variable holds only its own write.
        for (i, var) in vars.iter().enumerate() {
            let _ = var.shallow_clone().fill_(i as f64 + 0.5);
        }
        for (i, var) in vars.iter().enumerate() {
            assert!(
                bool::try_from(var.eq(i as f64 + 0.5).all()).unwrap(),
                "case {case} t{i}"
            );
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            file,
            "case {case}: the file changed"
        );
        drop(vars);
        drop(vs);
        drop(owners);
    }
    assert!(
        mapped_total > 20,
        "only {mapped_total} tensors were used in place"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A diffusers folder renders the same image whether its weights are used in place or copied.
#[test]
fn mapped_and_copied_weights_render_the_same_image() {
    use stable_diffusion::pipeline::GenerateParams;
    let params = GenerateParams {
        prompt: "a red circle".into(),
        steps: 3,
        width: Some(32),
        height: Some(32),
        seed: 4,
        ..Default::default()
    };
    // With given kernels: `Auto` picks the text encoder's by where its weights are.
    for weight_kernels in [WeightKernels::Plain, WeightKernels::Packed] {
        let mut images = Vec::new();
        for copy_weights in [false, true] {
            let sd = StableDiffusion::load(
                &fixtures().join("tiny-sd1"),
                &LoadOptions {
                    copy_weights,
                    weight_kernels,
                    ..Default::default()
                },
            )
            .unwrap();
            images.push(sd.generate(&params, None).unwrap().to_rgb8().unwrap());
        }
        assert_eq!(images[0], images[1], "{weight_kernels:?}");
    }
}

/// `WeightKernels::Auto` is the packed path for SD 1.x/2.x and the plain one for SDXL (folders
/// and single files): bit for bit the image of the kernels it stands for, and within rounding
/// of the other (which does change it, so the comparison can tell them apart). An SD 1.x/2.x
/// folder used in place is the exception for its text encoder, which stays plain so that its
/// weights can leave memory between prompts (`idle_parts_leave_memory_between_calls`); with
/// its weights copied, its images are the packed ones bit for bit.
#[test]
fn weight_kernels_default_by_family() {
    let _g = tch::no_grad_guard();
    let load = |model: &Path, weight_kernels, copy_weights| {
        let options = LoadOptions {
            weight_kernels,
            copy_weights,
            ..Default::default()
        };
        StableDiffusion::load(model, &options).unwrap()
    };
    let params = stable_diffusion::pipeline::GenerateParams {
        prompt: "a red circle".into(),
        steps: 2,
        guidance: 5.0,
        seed: 3,
        width: Some(64),
        height: Some(64),
        ..Default::default()
    };
    for model in [fixtures().join("tiny-sd1"), fixtures().join("tiny-sd2")] {
        let render = |weight_kernels| {
            load(&model, weight_kernels, true)
                .generate(&params, None)
                .unwrap()
                .pixels
        };
        let auto = render(WeightKernels::Auto);
        let d = common::max_abs_diff(&auto, &render(WeightKernels::Packed));
        assert_eq!(
            d,
            0.0,
            "{}: auto with copied weights is not packed",
            model.display()
        );
    }
    // A single file reads its configs and tokenizers from the folder it was written from.
    let render = |model: &Path, weight_kernels| {
        let folder = model.extension().map(|_| {
            let stem = model.file_stem().unwrap().to_str().unwrap();
            fixtures().join(stem)
        });
        let sd = StableDiffusion::load_with(
            model,
            &LoadOptions {
                weight_kernels,
                ..Default::default()
            },
            &ModelOverrides {
                config_dir: folder,
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("{}: {e}", model.display()));
        sd.generate(&params, None).unwrap().pixels
    };
    let single = fixtures().join("single");
    for (model, default) in [
        (fixtures().join("tiny-sdxl"), WeightKernels::Plain),
        (single.join("tiny-sd1.safetensors"), WeightKernels::Packed),
        (single.join("tiny-sdxl.safetensors"), WeightKernels::Plain),
    ] {
        let other = if default == WeightKernels::Packed {
            WeightKernels::Plain
        } else {
            WeightKernels::Packed
        };
        let auto = render(&model, WeightKernels::Auto);
        let name = model.display();
        assert_eq!(
            common::max_abs_diff(&auto, &render(&model, default)),
            0.0,
            "{name}: auto is not {default:?}"
        );
        let d = common::max_abs_diff(&auto, &render(&model, other));
        assert!(d > 0.0 && d < 1e-3, "{name}: {other:?} differs by {d}");
    }
}

/// Layers that pack their weights (the default on the CPU in float32) let go of the dense
/// copies: after a UNet call, a model using its folder in place keeps resident only the pages
/// of its UNet file around the tensors that are not packed (norms, biases, embeddings; a read
/// fault maps the 64 KiB around it), where the plain kernels keep all of it; both give the
/// same output to rounding.
#[test]
fn packed_weights_leave_the_mapped_pages() {
    let _g = tch::no_grad_guard();
    // A copy of its own: other tests map the fixture's files at the same time.
    let model = ScratchModel::new("tiny-sd1", "packed");
    let (dir, file) = (model.root.clone(), model.unet_file());
    let size = std::fs::metadata(&file).unwrap().len();
    let refs = Refs::open("tiny-sd1");
    let mut outputs = Vec::new();
    for plain_weights in [true, false] {
        let sd = StableDiffusion::load(
            &dir,
            &LoadOptions {
                weight_kernels: if plain_weights {
                    WeightKernels::Plain
                } else {
                    WeightKernels::Packed
                },
                ..Default::default()
            },
        )
        .unwrap();
        let out = sd
            .unet
            .forward(&refs.get("unet_sample"), 537.0, &refs.get("unet_ehs"))
            .unwrap();
        let resident = mapped_rss_bytes(&file);
        eprintln!("plain {plain_weights}: {resident} of {size} bytes resident after a call");
        if plain_weights {
            assert!(resident >= size * 9 / 10, "{resident} of {size}");
        } else {
            let bound = unpacked_neighbourhood(&file);
            assert!(
                resident <= bound && resident < size * 7 / 10,
                "{resident} of {size} still resident (bound {bound})"
            );
        }
        outputs.push(out);
        drop(sd);
    }
    let err = common::max_abs_diff(&outputs[0], &outputs[1]);
    assert!(err <= 1e-4, "packed and plain UNet differ by {err}");
}

/// The bytes of the 64 KiB windows of `path` that hold its header or a tensor that no layer
/// packs (anything but 2-D and 4-D weights).
fn unpacked_neighbourhood(path: &Path) -> u64 {
    const WINDOW: usize = 64 << 10;
    let file = stable_diffusion::weights::SafetensorsFile::open(path).unwrap();
    let mut windows: std::collections::BTreeSet<usize> = (0..=file.data_start() / WINDOW).collect();
    for name in file.names() {
        let info = file.info(name).unwrap();
        if matches!(info.shape.len(), 2 | 4) {
            continue;
        }
        let bytes = info.shape.iter().product::<i64>() as usize * common::dtype_size("F32");
        let end = info.offset() + bytes.max(1);
        windows.extend(info.offset() / WINDOW..=(end - 1) / WINDOW);
    }
    (windows.len() * WINDOW) as u64
}

/// `release_if_mapped` drops the pages of a tensor used in place, whose values then read back
/// from the file unchanged, and leaves memory of any other kind alone (seeded files and
/// tensor ranges, including ones that share pages with their neighbours).
#[test]
fn releasing_a_mapped_tensor_keeps_its_values() {
    use stable_diffusion::weights::{release_if_mapped, SafetensorsFile};
    let dir = std::env::temp_dir().join(format!("sd-weights-release-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = common::Rng::new(23);
    let mut used_in_place = 0;
    for case in 0..4 {
        let mut tensors = Vec::new();
        for i in 0..(2 + rng.below(4)) {
            let rows = 1 + rng.below(700) as u64;
            let data: Vec<u8> = (0..rows * 1024 * 4)
                .map(|_| rng.next_u64() as u8 & 0x3b)
                .collect();
            tensors.push((format!("w{i}"), "F32".to_string(), vec![rows, 1024], data));
        }
        let path = dir.join(format!("case{case}.safetensors"));
        std::fs::write(&path, common::write_safetensors(&tensors)).unwrap();
        let file = SafetensorsFile::open(&path).unwrap();
        file.populate();
        for (name, ..) in &tensors {
            // Used in place only where the header leaves the data aligned for f32.
            let Some((view, _owner)) = file.mapped(name, Kind::Float) else {
                continue;
            };
            used_in_place += 1;
            let copy = view.copy();
            let bytes = view.numel() * 4;
            assert!(
                release_if_mapped(view.data_ptr() as usize, bytes),
                "case {case}: {name}"
            );
            assert!(view.equal(&copy), "case {case}: {name} changed");
            assert!(view.equal(&file.tensor(name).unwrap()));
            assert!(!release_if_mapped(copy.data_ptr() as usize, bytes));
            assert!(copy.equal(&view), "case {case}: heap memory touched");
        }
        // Released again without reading them: none of their pages stays resident.
        for (name, ..) in &tensors {
            if let Some((view, _owner)) = file.mapped(name, Kind::Float) {
                assert!(release_if_mapped(
                    view.data_ptr() as usize,
                    view.numel() * 4
                ));
            } else {
                file.release(name);
            }
        }
        let resident = mapped_rss_bytes(&path);
        assert!(
            resident <= 64 << 10,
            "case {case}: {resident} bytes resident"
        );
    }
    assert!(used_in_place > 0, "no seeded file left its data aligned");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// After a packed model's first call its dense weights are let go, while the biases and norms
/// beside them are read at every step. Only matrices and convolution kernels are used in place,
/// so reading the rest never maps back a page of the file: a read fault in a file map brings
/// back the pages around it (64 KiB on older kernels, a whole large folio of megabytes on Linux
/// 6.x), and those would be the released weight's. Seeded layer sizes, biases between weights.
#[test]
fn reading_biases_never_maps_back_released_weights() {
    use stable_diffusion::weights::{load_into_mapped, release_if_mapped, WeightSet};
    let _g = tch::no_grad_guard();
    // SAFETY: sysconf has no preconditions.
    let page = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u64;
    let dir = std::env::temp_dir().join(format!("sd-weights-biases-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = common::Rng::new(31);
    for case in 0..3 {
        let layers = 16 + rng.below(16);
        let mut tensors = Vec::new();
        let mut values = Vec::new();
        for i in 0..layers {
            let out = 8 + rng.below(600) as u64;
            for (part, shape) in [("bias", vec![out]), ("weight", vec![out, 256])] {
                let numel: u64 = shape.iter().product();
                let v: Vec<f32> = (0..numel)
                    .map(|_| rng.below(2000) as f32 / 64.0 - 15.0)
                    .collect();
                let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                let name = format!("l{i:02}_{part}");
                tensors.push((name.clone(), "F32".to_string(), shape, bytes));
                values.push((name, v));
            }
        }
        let path = dir.join(format!("case{case}.safetensors"));
        let mut file = common::write_safetensors(&tensors);
        // Pad the header with spaces (valid JSON) so that the data is aligned for f32.
        let header_len = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
        let pad = (8 - header_len % 8) % 8;
        file.splice(
            8 + header_len..8 + header_len,
            std::iter::repeat(b' ').take(pad),
        );
        file[..8].copy_from_slice(&((header_len + pad) as u64).to_le_bytes());
        std::fs::write(&path, &file).unwrap();
        let weights = WeightSet::open(&[path.clone()]).unwrap();
        let vs = tch::nn::VarStore::new(tch::Device::Cpu);
        let vars: Vec<Tensor> = tensors
            .iter()
            .map(|(name, _, shape, _)| {
                let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                vs.root().add(
                    name,
                    Tensor::zeros(shape.as_slice(), (Kind::Float, tch::Device::Cpu)),
                    false,
                )
            })
            .collect();
        let owners = load_into_mapped(&weights, &vs, |n| vec![n.to_string()], true).unwrap();
        assert_eq!(owners.len(), 1, "case {case}: nothing used in place");
        // What packing does: every weight lets go of its pages (used in place, so released).
        for ((name, _), var) in values.iter().zip(&vars) {
            if name.ends_with("_weight") {
                let bytes = var.numel() * 4;
                assert!(
                    release_if_mapped(var.data_ptr() as usize, bytes),
                    "case {case}: {name} is not used in place"
                );
            }
        }
        // What every later step does: read the biases.
        for ((name, v), var) in values.iter().zip(&vars) {
            if name.ends_with("_bias") {
                assert!(
                    !release_if_mapped(var.data_ptr() as usize, var.numel() * 4),
                    "case {case}: {name} is used in place"
                );
                assert!(var.equal(&Tensor::from_slice(v)), "case {case}: {name}");
            }
        }
        // Left resident: the header and the biases' own pages from loading, and at most the
        // two pages each weight shares with its neighbours.
        let bias_pages: u64 = tensors
            .iter()
            .filter(|(n, ..)| n.ends_with("_bias"))
            .map(|(_, _, shape, _)| (shape[0] * 4).div_ceil(page) + 1)
            .sum();
        let bound = (2 + bias_pages + 2 * layers as u64) * page;
        let resident = mapped_rss_bytes(&path);
        eprintln!("case {case}: {layers} layers, {resident} bytes resident (bound {bound})");
        assert!(
            resident <= bound,
            "case {case}: {resident} bytes of the file resident after reading the biases, more than {bound}"
        );
        drop((vars, vs, owners));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every part used in place from its files lets its pages go once loaded and once a call has
/// used it: the text encoders after the conditioning, the UNet when the loop is over, the VAE
/// after each decode or encode, so that only the UNet's weights are resident through a loop;
/// the images are those of the same weights copied into memory.
/// Seeded widths of the text encoder (its layers then span many pages), each weight kernel
/// choice, txt2img and a VAE encode; encoding or decoding directly (no pipeline call around
/// it) leaves the pages resident, which shows the check can fail.
#[test]
fn idle_parts_leave_memory_between_calls() {
    let _g = tch::no_grad_guard();
    let mut rng = common::Rng::new(41);
    let kernels = [
        WeightKernels::Auto,
        WeightKernels::Plain,
        WeightKernels::Packed,
    ];
    for case in 0..3u64 {
        let model = ScratchModel::new("tiny-sd1", &format!("idle{case}"));
        let intermediate = 2048 * (1 + rng.below(4) as i64);
        model.widen_text_encoder(intermediate, case);
        let text_file = model.root.join("text_encoder").join("model.safetensors");
        let vae_file = model
            .root
            .join("vae")
            .join("diffusion_pytorch_model.safetensors");
        let vae_bytes = std::fs::metadata(&vae_file).unwrap().len();
        // fc1 and fc2 of its five layers, float32.
        let widened = (2 * 5 * intermediate * 32 * 4) as u64;
        let weight_kernels = kernels[case as usize];
        let load = |copy_weights| {
            let options = LoadOptions {
                weight_kernels,
                copy_weights,
                ..Default::default()
            };
            StableDiffusion::load(&model.root, &options).unwrap()
        };
        let (mapped, copied) = (load(false), load(true));
        let unet_file = model.unet_file();
        let unet_bytes = std::fs::metadata(&unet_file).unwrap().len();
        let idle = |when: &str| {
            let (text, vae) = (mapped_rss_bytes(&text_file), mapped_rss_bytes(&vae_file));
            let unet = mapped_rss_bytes(&unet_file);
            eprintln!(
                "case {case} ({weight_kernels:?}) {when}: text {text} of {widened}, vae {vae} \
                 of {vae_bytes}, unet {unet} of {unet_bytes}"
            );
            assert!(
                text < widened / 8 && vae < vae_bytes / 4 && unet < unet_bytes / 4,
                "case {case} ({weight_kernels:?}) {when}: {text} bytes of the text encoder's \
                 file, {vae} of the VAE's and {unet} of the UNet's resident"
            );
        };
        idle("loaded");
        for round in 0..2 {
            let params = stable_diffusion::pipeline::GenerateParams {
                prompt: "a red circle".into(),
                steps: 2,
                guidance: 5.0,
                seed: rng.below(1 << 20) as u64,
                width: Some(64),
                height: Some(64),
                ..Default::default()
            };
            if weight_kernels != WeightKernels::Packed {
                // All of it: Auto leaves a text encoder used in place on the plain kernels
                // (packed, the dense fc1 weights, half of it, would have left).
                let _ = mapped.encode_prompt("a blue square", 1, 0).unwrap();
                let text = mapped_rss_bytes(&text_file);
                assert!(
                    text > widened * 3 / 4,
                    "case {case}: encoding left {text} resident"
                );
            }
            let z = common::locked_randn(&[1, 4, 8, 8]);
            let _ = mapped.vae.decode(&z).unwrap();
            let vae = mapped_rss_bytes(&vae_file);
            assert!(
                vae > vae_bytes / 4,
                "case {case}: decoding left {vae} resident"
            );

            let image = mapped.generate(&params, None).unwrap().pixels;
            idle(&format!("round {round} generated"));
            let want = copied.generate(&params, None).unwrap().pixels;
            // Auto packs the text encoder only when its weights are copied: rounding apart.
            let tolerance = if weight_kernels == WeightKernels::Auto {
                1e-3
            } else {
                0.0
            };
            let d = common::max_abs_diff(&image, &want);
            assert!(
                d <= tolerance,
                "case {case} round {round}: images differ by {d}"
            );

            let images = common::locked_randn(&[1, 3, 64, 64]).clamp(-1.0, 1.0);
            let stop = || Ok(());
            let latents = mapped.encode_image(&images, &params, &stop).unwrap().mean;
            let want = copied.encode_image(&images, &params, &stop).unwrap().mean;
            assert_eq!(common::max_abs_diff(&latents, &want), 0.0);
            idle(&format!("round {round} encoded an image"));
        }
    }
}

/// In a bf16 pipeline on the CPU, a text encoder stored in float32 and used in place runs in
/// float32 from its file: its conditioning is the float32 pipeline's cast to bf16, bit for bit
/// (a bf16 copy, as with copied weights, differs by rounding). Under
/// `release_layers_as_they_run`, as a generation encodes, its pages do not stay resident;
/// without it they do. Seeded widths of the encoder and prompts; SD 1.x and SDXL's two
/// encoders.
#[test]
fn bf16_pipeline_runs_a_float32_text_encoder_from_its_file() {
    use stable_diffusion::models::clip::release_layers_as_they_run;
    let _g = tch::no_grad_guard();
    let mut rng = common::Rng::new(77);
    let prompts = [
        "a red circle",
        "a photo of a cat, wearing sunglasses!",
        "",
        "a small green cross in the top left on a black background",
    ];
    let load = |root: &Path, kind, copy_weights| {
        let options = LoadOptions {
            kind,
            copy_weights,
            ..Default::default()
        };
        StableDiffusion::load(root, &options).unwrap()
    };
    for case in 0..2u64 {
        let model = ScratchModel::new("tiny-sd1", &format!("bf16te{case}"));
        let intermediate = 2048 * (1 + rng.below(3) as i64);
        model.widen_text_encoder(intermediate, case);
        let text_file = model.root.join("text_encoder").join("model.safetensors");
        let widened = (2 * 5 * intermediate * 32 * 4) as u64;
        let float32 = load(&model.root, Kind::Float, false);
        let bf16 = load(&model.root, Kind::BFloat16, false);
        let copied = load(&model.root, Kind::BFloat16, true);
        for _ in 0..2 {
            let (prompt, negative) = (*rng.pick(&prompts), *rng.pick(&prompts));
            let want = float32
                .encode_prompt_pair(prompt, negative, 1, 0)
                .unwrap()
                .to_kind(Kind::BFloat16);
            let got = bf16.encode_prompt_pair(prompt, negative, 1, 0).unwrap();
            assert_eq!(got.kind(), Kind::BFloat16);
            assert!(got.equal(&want), "case {case}: {prompt:?} / {negative:?}");
            let held_in_bf16 = copied.encode_prompt_pair(prompt, negative, 1, 0).unwrap();
            let rounding = common::max_abs_diff(
                &held_in_bf16.to_kind(Kind::Float),
                &want.to_kind(Kind::Float),
            );
            assert!(
                rounding > 0.0 && rounding < 0.1,
                "case {case}: a bf16 copy differs by {rounding}"
            );
        }
        // A direct encode leaves the pages resident (the check below can fail); one made as a
        // generation makes it does not. (The float32 pipeline maps the same file.)
        float32.release_idle_weights();
        let _ = bf16.encode_prompt("a blue square", 1, 0).unwrap();
        let resident = mapped_rss_bytes(&text_file);
        assert!(
            resident > widened * 3 / 4,
            "case {case}: {resident} resident"
        );
        bf16.release_idle_weights();
        {
            let _layers = release_layers_as_they_run();
            let _ = bf16.encode_prompt("a blue square", 1, 0).unwrap();
        }
        // What stays: small tensors read whole, and neighbours of a released layer that a
        // later fault maps back with its page-cache folio (a generation then lets go of all).
        let resident = mapped_rss_bytes(&text_file);
        assert!(resident < widened / 4, "case {case}: {resident} resident");
    }

    // SDXL's two encoders: states and pooled outputs.
    let root = fixtures().join("tiny-sdxl");
    let float32 = load(&root, Kind::Float, false);
    let bf16 = load(&root, Kind::BFloat16, false);
    for prompt in prompts {
        let (states, pooled) = float32.encode_prompt_sdxl(prompt, "a dog", 2, 0).unwrap();
        let (got_states, got_pooled) = bf16.encode_prompt_sdxl(prompt, "a dog", 2, 0).unwrap();
        assert!(
            got_states.equal(&states.to_kind(Kind::BFloat16)),
            "{prompt:?}"
        );
        assert!(
            got_pooled.equal(&pooled.to_kind(Kind::BFloat16)),
            "{prompt:?}"
        );
    }
}

/// The text encoder's token table, used in place from its file, does not stay resident after
/// a lookup (a prompt reads a few dozen of its rows), and each later lookup still reads the
/// stored rows. Seeded tables of 2-8 MiB (the fixture's rows, then more past the tokenizer's
/// ids) and both weight kernels; three encodes each, every output equal to transformers'
/// reference for the fixture's ids.
#[test]
fn token_table_leaves_memory_after_each_lookup() {
    let _g = tch::no_grad_guard();
    let refs = Refs::open("tiny-sd1");
    let (ids, expected) = (refs.get("text_ids"), refs.get("text_hidden"));
    let mut rng = common::Rng::new(23);
    for case in 0..3 {
        let model = ScratchModel::new("tiny-sd1", &format!("table{case}"));
        let dir = model.root.join("text_encoder");
        let file = dir.join("model.safetensors");
        let name = "text_model.embeddings.token_embedding.weight";
        let mut tensors = Tensor::read_safetensors(&file).unwrap();
        let table = &mut tensors.iter_mut().find(|(n, _)| n == name).unwrap().1;
        let (rows, width) = table.size2().unwrap();
        let extra = 16384 * (1 + rng.below(4) as i64);
        let more = Tensor::arange(extra * width, (Kind::Float, tch::Device::Cpu))
            .view([extra, width])
            .sin();
        *table = Tensor::cat(&[table.shallow_clone(), more], 0);
        let table_bytes = ((rows + extra) * width * 4) as u64;
        Tensor::write_safetensors(&tensors, &file).unwrap();
        let config_path = dir.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        config["vocab_size"] = (rows + extra).into();
        std::fs::write(&config_path, config.to_string()).unwrap();

        let weight_kernels = [WeightKernels::Plain, WeightKernels::Packed][case % 2];
        let options = LoadOptions {
            weight_kernels,
            ..Default::default()
        };
        let sd = StableDiffusion::load(&model.root, &options).unwrap();
        for round in 0..3 {
            let hidden = sd.text_encoder.forward(&ids, 0).unwrap();
            common::assert_close(
                &format!("case {case} round {round} text_hidden"),
                &hidden,
                &expected,
                1e-4,
            );
            let resident = mapped_rss_bytes(&file);
            assert!(
                resident < table_bytes / 4,
                "case {case} ({weight_kernels:?}) round {round}: {resident} bytes of the text \
                 encoder file resident after a lookup; the table alone is {table_bytes}"
            );
        }
    }
}
