//! Helpers shared by the parity tests: fixture paths and tensor comparisons.
#![allow(dead_code)]
use stable_diffusion::weights::SafetensorsFile;
use std::path::PathBuf;
use tch::{Kind, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

pub struct Refs {
    file: SafetensorsFile,
}

impl Refs {
    pub fn open(model: &str) -> Self {
        let path = fixtures().join(format!("{model}-refs.safetensors"));
        Self {
            file: SafetensorsFile::open(&path).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    pub fn get(&self, name: &str) -> Tensor {
        self.file.tensor(name).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.info(name).is_some()
    }
}

pub fn cases(model: &str) -> serde_json::Value {
    let path = fixtures().join(format!("{model}-cases.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Python's json writes non-finite floats (e.g. DPM's lambda_min_clipped) as bare words.
    let text = text
        .replace("-Infinity", "null")
        .replace("Infinity", "null")
        .replace("NaN", "null");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    (a - b).abs().max().double_value(&[])
}

/// Asserts `max |actual - expected| <= tol`, naming what was compared.
pub fn assert_close(what: &str, actual: &Tensor, expected: &Tensor, tol: f64) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let err = max_abs_diff(actual, expected);
    let scale = expected.to_kind(Kind::Double).abs().max().double_value(&[]);
    eprintln!("{what}: max abs error {err:.3e} (max |ref| {scale:.3})");
    assert!(err <= tol, "{what}: max abs error {err:e} > {tol:e}");
    // A comparison against an all-zero reference would prove little.
    assert!(scale > 0.0, "{what}: reference is all zeros");
}
