//! `sd_lora`: a LoRA file read once into a handle, applied per call through
//! `sd_generate_params.loras`.
use super::convert::required_str;
use super::status::{clear_out, guard, guard_void, sd_status, Fail};
use super::types::sd_lora_weight;
use crate::lora::{Lora, LoraWeight, MAX_LORAS_PER_CALL};
use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;

const LORA_MAGIC: u64 = 0x5344_4c4f_5241_484e; // "SDLORAHN"

/// A LoRA read into memory. Create it with `sd_lora_load`, release it with `sd_lora_free`.
/// It belongs to no pipeline: one handle may be applied to any number of pipelines it fits,
/// from any thread, and a job keeps what it needs of it until the job ends.
pub struct sd_lora {
    pub(crate) magic: u64,
    pub(crate) lora: Arc<Lora>,
}

/// Reads a LoRA `.safetensors` file (kohya / A1111 or diffusers / PEFT layout; SD 1.x, 2.x or
/// SDXL) into `*out_lora` (NULL on failure). The file is read once and never written. Whether
/// it fits a model is checked when a call applies it, naming the first tensor that does not.
///
/// Ownership: the caller owns the handle and releases it with `sd_lora_free`.
/// Threading: thread-safe.
/// Errors: `SD_ERR_INVALID_ARGUMENT` (NULL, bad UTF-8), `SD_ERR_IO` (missing or unreadable
/// file), `SD_ERR_BAD_MODEL` (not a LoRA file, tensors of the wrong shape or values),
/// `SD_ERR_UNSUPPORTED` (another kind of network: LyCORIS LoHa, LoKr, ...; the message names
/// it).
///
/// Pointers: each one NULL (an error) or valid; `path` is UTF-8, borrowed for the call.
#[no_mangle]
pub unsafe extern "C" fn sd_lora_load(
    path: *const c_char,
    out_lora: *mut *mut sd_lora,
) -> sd_status {
    guard(|| {
        clear_out(out_lora, "out_lora", std::ptr::null_mut())?;
        let path = required_str(path, "path")?;
        let lora = Arc::new(Lora::load(Path::new(path))?);
        out_lora.write(Box::into_raw(Box::new(sd_lora {
            magic: LORA_MAGIC,
            lora,
        })));
        Ok(())
    })
}

/// Releases a LoRA handle. Jobs already submitted with it are not affected. NULL is ignored.
///
/// Threading: must not race with a call that borrows this handle.
///
/// Pointers: `lora` is NULL or a live handle not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sd_lora_free(lora: *mut sd_lora) {
    guard_void(|| {
        if lora.as_ref().is_some_and(|l| l.magic == LORA_MAGIC) {
            let mut handle = Box::from_raw(lora);
            handle.magic = 0;
        }
    })
}

/// The `count` LoRAs at `p`, with their weights (checked when the call binds them).
///
/// # Safety
/// `p` is NULL or points to `count` readable `sd_lora_weight`s whose handles are NULL or live.
pub(crate) unsafe fn lora_weights(
    p: *const sd_lora_weight,
    count: usize,
) -> Result<Vec<LoraWeight>, Fail> {
    if count == 0 {
        return Ok(Vec::new());
    }
    if p.is_null() {
        return Err(Fail::invalid(format!(
            "params->loras is NULL but params->lora_count is {count}"
        )));
    }
    if count > MAX_LORAS_PER_CALL {
        return Err(Fail::invalid(format!(
            "params->lora_count is {count}: at most {MAX_LORAS_PER_CALL} LoRAs a call"
        )));
    }
    (0..count)
        .map(|i| {
            let entry = p.add(i).read();
            match entry.lora.as_ref() {
                Some(h) if h.magic == LORA_MAGIC => {
                    Ok(LoraWeight::new(h.lora.clone(), entry.weight))
                }
                Some(_) => Err(Fail::invalid(format!(
                    "params->loras[{i}].lora is not a live sd_lora handle"
                ))),
                None => Err(Fail::invalid(format!("params->loras[{i}].lora is NULL"))),
            }
        })
        .collect()
}
