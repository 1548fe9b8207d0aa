//! AdamW with its state in plain tensors (so checkpoints resume exactly), an exponential
//! moving average of the weights, the learning-rate schedule, checkpoints and progress bars.
use crate::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// The trainable variables of a store, sorted by name (a fixed order for the state).
pub fn named_trainables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

pub fn parameter_count(vs: &VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

/// AdamW (decoupled weight decay), bias-corrected.
pub struct AdamW {
    vars: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub steps: i64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Tensor)>, weight_decay: f64) -> Self {
        let m = vars.iter().map(|(_, t)| t.zeros_like()).collect();
        let v = vars.iter().map(|(_, t)| t.zeros_like()).collect();
        Self {
            vars,
            m,
            v,
            steps: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    pub fn zero_grad(&mut self) {
        for (_, t) in &mut self.vars {
            t.zero_grad();
        }
    }

    /// Scales the gradients so that their global norm is at most `max`; returns the norm
    /// before clipping.
    pub fn clip_grad_norm(&mut self, max: f64) -> Result<f64> {
        let _g = tch::no_grad_guard();
        let mut total = 0f64;
        for (_, t) in &self.vars {
            let g = t.grad();
            if g.defined() {
                total += g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        let norm = total.sqrt();
        if norm > max && norm.is_finite() {
            let scale = max / (norm + 1e-6);
            for (_, t) in &self.vars {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(scale)?;
                }
            }
        }
        Ok(norm)
    }

    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _g = tch::no_grad_guard();
        self.steps += 1;
        let bc1 = 1.0 - self.beta1.powi(self.steps as i32);
        let bc2 = 1.0 - self.beta2.powi(self.steps as i32);
        for (i, (_, var)) in self.vars.iter_mut().enumerate() {
            let g = var.grad();
            if !g.defined() {
                continue;
            }
            let _ = self.m[i].f_mul_scalar_(self.beta1)?;
            let _ = self.m[i].f_add_(&g.f_mul_scalar(1.0 - self.beta1)?)?;
            let _ = self.v[i].f_mul_scalar_(self.beta2)?;
            let _ = self.v[i].f_addcmul_(&g, &g.f_mul_scalar(1.0 - self.beta2)?)?;
            if self.weight_decay > 0.0 && var.dim() > 1 {
                let _ = var.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
            }
            let denom = self.v[i]
                .f_div_scalar(bc2)?
                .f_sqrt()?
                .f_add_scalar(self.eps)?;
            let update = self.m[i].f_div(&denom)?.f_mul_scalar(lr / bc1)?;
            let _ = var.f_sub_(&update)?;
        }
        Ok(())
    }

    /// The moments, named `adam_m.<var>` / `adam_v.<var>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("adam_m.{name}"), self.m[i].shallow_clone()));
            out.push((format!("adam_v.{name}"), self.v[i].shallow_clone()));
        }
        out
    }

    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        let _g = tch::no_grad_guard();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("adam_m", &mut self.m[i]), ("adam_v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let src = tensors
                    .get(&key)
                    .ok_or_else(|| Error::Internal(format!("checkpoint lacks {key}")))?;
                slot.f_copy_(src)?;
            }
        }
        Ok(())
    }
}

/// Exponential moving average of the weights, with the usual warm-up of the decay
/// (`min(decay, (1 + n) / (10 + n))`).
pub struct Ema {
    shadow: Vec<(String, Tensor)>,
    pub decay: f64,
}

impl Ema {
    pub fn new(vars: &[(String, Tensor)], decay: f64) -> Self {
        let _g = tch::no_grad_guard();
        let shadow = vars
            .iter()
            .map(|(n, t)| (n.clone(), t.detach().copy()))
            .collect();
        Self { shadow, decay }
    }

    pub fn update(&mut self, vars: &[(String, Tensor)], step: i64) -> Result<()> {
        let _g = tch::no_grad_guard();
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64));
        for ((_, s), (_, v)) in self.shadow.iter_mut().zip(vars) {
            let _ = s.f_mul_scalar_(d)?;
            let _ = s.f_add_(&v.f_mul_scalar(1.0 - d)?)?;
        }
        Ok(())
    }

    /// Named `ema.<var>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.shadow
            .iter()
            .map(|(n, t)| (format!("ema.{n}"), t.shallow_clone()))
            .collect()
    }

    pub fn load_state(
        &mut self,
        tensors: &std::collections::HashMap<String, Tensor>,
    ) -> Result<()> {
        let _g = tch::no_grad_guard();
        for (name, s) in &mut self.shadow {
            let key = format!("ema.{name}");
            let src = tensors
                .get(&key)
                .ok_or_else(|| Error::Internal(format!("checkpoint lacks {key}")))?;
            s.f_copy_(src)?;
        }
        Ok(())
    }

    /// Copies the averaged weights into `vs` (variables matched by name).
    pub fn copy_to(&self, vs: &VarStore) -> Result<()> {
        let _g = tch::no_grad_guard();
        let mut vars = vs.variables();
        for (name, s) in &self.shadow {
            let v = vars
                .get_mut(name)
                .ok_or_else(|| Error::Internal(format!("no variable {name}")))?;
            v.f_copy_(s)?;
        }
        Ok(())
    }
}

/// Linear warm-up over `warmup` steps, then cosine decay to `min_ratio * peak` at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cos)
}

/// Where a stage keeps its checkpoint: `<dir>/<stage>.safetensors` (weights, optimiser and
/// EMA state) and `<dir>/<stage>.json` (step, losses, whether the stage is finished).
pub struct Checkpoint {
    pub tensors: PathBuf,
    pub meta: PathBuf,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    pub stage: String,
    pub seed: u64,
    pub step: usize,
    pub total_steps: usize,
    pub finished: bool,
    /// Mean loss of each logged window of steps.
    pub losses: Vec<f64>,
    /// Seconds spent in the stage so far (over all runs).
    pub seconds: f64,
    /// Stage-specific figures (PSNR, retrieval accuracy, ...).
    #[serde(default)]
    pub figures: serde_json::Map<String, serde_json::Value>,
}

impl Checkpoint {
    pub fn new(dir: &Path, stage: &str) -> Self {
        Self {
            tensors: dir.join(format!("{stage}.safetensors")),
            meta: dir.join(format!("{stage}.json")),
        }
    }

    pub fn read_meta(&self) -> Result<Option<CheckpointMeta>> {
        if !self.meta.is_file() || !self.tensors.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.meta).map_err(|e| Error::io(&self.meta, e))?;
        let meta = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: self.meta.clone(),
            source: e,
        })?;
        Ok(Some(meta))
    }

    pub fn read_tensors(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        Ok(Tensor::read_safetensors(&self.tensors)?
            .into_iter()
            .collect())
    }

    /// Writes both files through temporary names, so an interrupted write leaves the old
    /// checkpoint intact.
    pub fn write(&self, tensors: &[(String, Tensor)], meta: &CheckpointMeta) -> Result<()> {
        if let Some(dir) = self.tensors.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = self.tensors.with_extension("tmp.safetensors");
        let contiguous: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.detach().f_contiguous()?)))
            .collect::<Result<_>>()?;
        Tensor::write_safetensors(&contiguous, &tmp)?;
        std::fs::rename(&tmp, &self.tensors).map_err(|e| Error::io(&self.tensors, e))?;
        let tmp = self.meta.with_extension("tmp.json");
        let text = serde_json::to_string_pretty(meta).map_err(|e| Error::Json {
            path: self.meta.clone(),
            source: e,
        })?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.meta).map_err(|e| Error::io(&self.meta, e))?;
        Ok(())
    }
}

/// The model variables of a store, named `model.<var>`.
pub fn model_state(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("model.{n}"), t))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Fills a store from `model.<var>` tensors.
pub fn load_model_state(
    vs: &VarStore,
    tensors: &std::collections::HashMap<String, Tensor>,
) -> Result<()> {
    let _g = tch::no_grad_guard();
    for (name, mut var) in vs.variables() {
        let key = format!("model.{name}");
        let src = tensors
            .get(&key)
            .ok_or_else(|| Error::Internal(format!("checkpoint lacks {key}")))?;
        var.f_copy_(src)?;
    }
    Ok(())
}

/// A progress bar for `total` steps of a stage (hidden when `show` is false).
pub fn progress(stage: &str, total: usize, done: usize, show: bool) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(total as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>6} [{elapsed_precise}] {bar:30} {pos}/{len} steps (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(stage.to_string());
    bar.set_position(done as u64);
    bar
}
