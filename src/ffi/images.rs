//! `sd_images`: the images a generate call or a job returns, owned by the library until
//! `sd_images_free`.
use super::status::{clear_out, guard, guard_void, sd_status, Fail};
use super::types::sd_image;
use crate::pipeline::Images;

const IMAGES_MAGIC: u64 = 0x5344_494d_4147_4553; // "SDIMAGES"

/// An image the library owns: the pixels and the `sd_image` view of them handed to C.
pub(crate) struct OwnedImage {
    view: sd_image,
    _pixels: Box<[u8]>,
}

// SAFETY: `view.data` points into `_pixels`, which moves with it and is never written.
unsafe impl Send for OwnedImage {}

impl OwnedImage {
    /// Packed RGB pixels, widened to RGBA with opaque alpha when `channels` is 4.
    pub fn from_rgb(width: u32, height: u32, rgb: &[u8], channels: u32) -> Self {
        let pixels: Box<[u8]> = if channels == 4 {
            rgb.chunks_exact(3)
                .flat_map(|p| [p[0], p[1], p[2], 255])
                .collect()
        } else {
            rgb.into()
        };
        let view = sd_image {
            data: pixels.as_ptr(),
            width,
            height,
            stride: width * channels,
            channels,
        };
        Self {
            view,
            _pixels: pixels,
        }
    }

    pub fn view(&self) -> *const sd_image {
        &self.view
    }
}

/// Generated images, owned by the library: read them with `sd_images_count` and
/// `sd_images_get`, release them with `sd_images_free`.
pub struct sd_images {
    magic: u64,
    items: Vec<OwnedImage>,
}

impl sd_images {
    /// The pipeline's float images as 8-bit pixels with `channels` (3 or 4) per pixel.
    pub(crate) fn from_images(images: &Images, channels: u32) -> Result<Box<Self>, Fail> {
        let (w, h) = (images.width(), images.height());
        let items = images
            .to_rgb8()?
            .iter()
            .map(|rgb| OwnedImage::from_rgb(w, h, rgb, channels))
            .collect();
        Ok(Box::new(Self {
            magic: IMAGES_MAGIC,
            items,
        }))
    }

    /// 8-bit RGB images (previews) with `channels` (3 or 4) per pixel.
    pub(crate) fn from_rgb_images(images: &[crate::image_io::Image], channels: u32) -> Box<Self> {
        let items = images
            .iter()
            .map(|img| OwnedImage::from_rgb(img.width, img.height, &img.rgb, channels))
            .collect();
        Box::new(Self {
            magic: IMAGES_MAGIC,
            items,
        })
    }

    /// # Safety
    /// `p` is NULL or a live `sd_images` pointer.
    unsafe fn from_ptr<'a>(p: *const sd_images) -> Result<&'a Self, Fail> {
        match p.as_ref() {
            Some(images) if images.magic == IMAGES_MAGIC => Ok(images),
            Some(_) => Err(Fail::invalid("images is not a live sd_images handle")),
            None => Err(Fail::invalid("images is NULL")),
        }
    }
}

/// Stores the number of images in `*out_count` (0 on failure).
///
/// Errors: `SD_ERR_INVALID_ARGUMENT` when a pointer is NULL. Thread-safe (read-only).
///
/// Pointers: `images` is NULL or live; `out_count` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sd_images_count(
    images: *const sd_images,
    out_count: *mut usize,
) -> sd_status {
    guard(|| {
        clear_out(out_count, "out_count", 0)?;
        let images = sd_images::from_ptr(images)?;
        out_count.write(images.items.len());
        Ok(())
    })
}

/// Stores in `*out_image` a pointer to image `index` (0-based; NULL on failure). The `sd_image`
/// and its pixels belong to `images` and stay valid until `sd_images_free(images)`; do not write
/// or free them.
///
/// Errors: `SD_ERR_INVALID_ARGUMENT` when a pointer is NULL or `index` is out of range.
/// Thread-safe (read-only).
///
/// Pointers: `images` is NULL or live; `out_image` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sd_images_get(
    images: *const sd_images,
    index: usize,
    out_image: *mut *const sd_image,
) -> sd_status {
    guard(|| {
        clear_out(out_image, "out_image", std::ptr::null())?;
        let images = sd_images::from_ptr(images)?;
        let item = images.items.get(index).ok_or_else(|| {
            Fail::invalid(format!(
                "index {index} is out of range: there are {} images",
                images.items.len()
            ))
        })?;
        out_image.write(item.view());
        Ok(())
    })
}

/// Releases images and all their pixels. NULL is ignored. Not thread-safe with other calls on
/// the same `images`.
///
/// Pointers: `images` is NULL or a live `sd_images` not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn sd_images_free(images: *mut sd_images) {
    guard_void(|| {
        if let Ok(live) = sd_images::from_ptr(images) {
            if live.magic == IMAGES_MAGIC {
                let mut owned = Box::from_raw(images);
                owned.magic = 0;
            }
        }
    })
}
