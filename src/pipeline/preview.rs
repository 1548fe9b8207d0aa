//! A cheap look at the latents during denoising: a fixed linear map from the four SD 1.x / 2.x
//! latent channels to RGB, at latent resolution, with no VAE pass. Good enough to show shapes
//! and colours forming in a progress view; not a substitute for the decoded image.
use crate::image_io::Image;
use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The commonly used approximate contribution of each latent channel (rows) to R, G and B
/// (columns), for latents scaled as the UNet sees them. Output is roughly in [-1, 1].
const LATENT_TO_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];

/// One RGB image of `w` x `h` (the latents' spatial size) per batch item of `latents`
/// `[batch, 4, h, w]`, computed on the CPU in float32 whatever the latents' device and dtype.
pub fn latents_to_preview_rgb(latents: &Tensor) -> Result<Vec<Image>> {
    let dims = latents.size();
    let [batch, channels, h, w] = dims[..] else {
        return Err(Error::invalid(format!(
            "latents must be [batch, channels, height, width], got {dims:?}"
        )));
    };
    if channels != 4 {
        return Err(Error::Unsupported(format!(
            "a preview of {channels}-channel latents (only 4-channel SD 1.x / 2.x latents)"
        )));
    }
    let _no_grad = tch::no_grad_guard();
    let factors = Tensor::f_from_slice(LATENT_TO_RGB.as_flattened())?.f_view([4, 3])?;
    let bytes = latents
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_permute([0, 2, 3, 1])?
        .f_matmul(&factors)?
        .f_add_scalar(1.0)?
        .f_mul_scalar(127.5)?
        .f_clamp(0.0, 255.0)?
        .f_round()?
        .f_to_kind(Kind::Uint8)?
        .f_contiguous()?;
    let per_image = (h * w * 3) as usize;
    let mut flat = vec![0u8; per_image * batch as usize];
    let len = flat.len();
    bytes.f_copy_data_u8(&mut flat, len)?;
    flat.chunks(per_image)
        .map(|rgb| Image::new(w as u32, h as u32, rgb.to_vec()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_image_per_batch_item_at_latent_size() {
        let latents = Tensor::zeros([2, 4, 3, 5], (Kind::Float, Device::Cpu));
        let images = latents_to_preview_rgb(&latents).unwrap();
        assert_eq!(images.len(), 2);
        assert_eq!((images[0].width, images[0].height), (5, 3));
        // Zero latents map to mid grey.
        assert!(images[0].rgb.iter().all(|&v| v == 128));
    }

    #[test]
    fn channel_one_drives_red_up() {
        let mut values = vec![0f32; 4];
        values[0] = 1.0;
        let latents = Tensor::from_slice(&values).view([1, 4, 1, 1]);
        let rgb = &latents_to_preview_rgb(&latents).unwrap()[0].rgb;
        assert!(
            rgb[0] > 128 && rgb[0] > rgb[1] && rgb[0] > rgb[2],
            "{rgb:?}"
        );
    }

    #[test]
    fn other_shapes_are_errors() {
        let three = Tensor::zeros([1, 3, 2, 2], (Kind::Float, Device::Cpu));
        assert!(matches!(
            latents_to_preview_rgb(&three),
            Err(Error::Unsupported(_))
        ));
        let flat = Tensor::zeros([4, 2], (Kind::Float, Device::Cpu));
        assert!(matches!(
            latents_to_preview_rgb(&flat),
            Err(Error::InvalidArgument(_))
        ));
    }
}
