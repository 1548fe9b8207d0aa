//! Running a VAE over an image in overlapping tiles, so that its activations are bounded by the
//! tile and not by the image: diffusers' `enable_vae_tiling` (`AutoencoderKL.tiled_decode` /
//! `_tiled_encode`). Tiles start every `3/4` of a tile; each is blended linearly with the tile
//! above and the tile to its left over a quarter of a tile, then cropped, so the seams fade
//! instead of showing.
use crate::{Error, Result};
use tch::Tensor;

/// The share of a tile that overlaps its neighbour (diffusers' `tile_overlap_factor`).
pub const OVERLAP: f64 = 0.25;

/// Fewest latent cells a tile may span on each side: smaller tiles leave the decoder too little
/// context around each cell.
pub const MIN_LATENT_TILE: i64 = 8;

/// A latent tile must span a multiple of this many cells, so that the tiles' steps (3/4 of a
/// tile) and blends (1/4) are whole cells on both sides and the cropped tiles cover the
/// output exactly (diffusers' tiles, 64 latent cells for SD 1.x, are).
pub const LATENT_TILE_MULTIPLE: i64 = 4;

/// The geometry of one tiled pass: tiles of `tile_in` cells of the input become tiles of
/// `tile_out` cells of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiles {
    pub tile_in: i64,
    pub tile_out: i64,
}

impl Tiles {
    /// Where tiles start along an input side: every `tile_in * (1 - OVERLAP)` cells, truncated.
    fn step(&self) -> i64 {
        ((self.tile_in as f64 * (1.0 - OVERLAP)) as i64).max(1)
    }

    /// Output cells blended with the previous tile.
    fn blend(&self) -> i64 {
        (self.tile_out as f64 * OVERLAP) as i64
    }

    /// `f` applied to every tile of `input` `[b, c, h, w]`, the results blended and joined
    /// (each tile's result must be `tile_out / tile_in` times its input's size, and the latent
    /// side a multiple of [`LATENT_TILE_MULTIPLE`]). `stop` is asked before each tile.
    pub fn run(
        &self,
        input: &Tensor,
        mut f: impl FnMut(&Tensor) -> Result<Tensor>,
        stop: &dyn Fn() -> Result<()>,
    ) -> Result<Tensor> {
        let size = input.size();
        let [_, _, h, w] = size[..] else {
            return Err(Error::invalid(format!(
                "tiling needs a [batch, channels, height, width] input, got {size:?}"
            )));
        };
        if self.tile_in <= 0 || self.tile_out <= 0 {
            return Err(Error::invalid(format!(
                "tile sizes must be positive: {self:?}"
            )));
        }
        let (step, blend) = (self.step(), self.blend());
        let keep = self.tile_out - blend;
        let mut above: Vec<Tensor> = Vec::new();
        let mut rows = Vec::new();
        for i in (0..h).step_by(step as usize) {
            let mut row: Vec<Tensor> = Vec::new();
            for (column, j) in (0..w).step_by(step as usize).enumerate() {
                stop()?;
                let tile_in = input.f_narrow(2, i, self.tile_in.min(h - i))?.f_narrow(
                    3,
                    j,
                    self.tile_in.min(w - j),
                )?;
                let mut tile = f(&tile_in)?;
                if let Some(top) = above.get(column) {
                    tile = blend_into(top, &tile, blend, 2)?;
                }
                if let Some(left) = row.last() {
                    tile = blend_into(left, &tile, blend, 3)?;
                }
                row.push(tile);
            }
            let cropped = row
                .iter()
                .map(|t| crop(t, keep))
                .collect::<Result<Vec<_>>>()?;
            rows.push(Tensor::f_cat(&cropped, 3)?);
            above = row;
        }
        Ok(Tensor::f_cat(&rows, 2)?)
    }
}

/// `b` with its first `extent` cells along `dim` (at most as many as either tile has) replaced
/// by a linear blend from `a`'s last cells to `b`'s own: diffusers' `blend_v` (dim 2) and
/// `blend_h` (dim 3), `a * (1 - y / extent) + b * (y / extent)`.
fn blend_into(a: &Tensor, b: &Tensor, extent: i64, dim: i64) -> Result<Tensor> {
    let extent = extent
        .min(a.size()[dim as usize])
        .min(b.size()[dim as usize]);
    if extent <= 0 {
        return Ok(b.shallow_clone());
    }
    let ramp: Vec<f64> = (0..extent).map(|y| y as f64 / extent as f64).collect();
    let rest: Vec<f64> = ramp.iter().map(|r| 1.0 - r).collect();
    let shape: Vec<i64> = if dim == 2 {
        vec![extent, 1]
    } else {
        vec![extent]
    };
    let as_weights = |v: &[f64]| -> Result<Tensor> {
        Ok(Tensor::f_from_slice(v)?
            .f_view(shape.as_slice())?
            .f_to_kind(b.kind())?
            .f_to_device(b.device())?)
    };
    let a_len = a.size()[dim as usize];
    let a_end = a.f_narrow(dim, a_len - extent, extent)?;
    let b_start = b.f_narrow(dim, 0, extent)?;
    let blended = a_end
        .f_mul(&as_weights(&rest)?)?
        .f_add(&b_start.f_mul(&as_weights(&ramp)?)?)?;
    let b_len = b.size()[dim as usize];
    let b_rest = b.f_narrow(dim, extent, b_len - extent)?;
    Ok(Tensor::f_cat(&[blended, b_rest], dim)?)
}

/// The top-left `keep x keep` cells of a tile (all of a smaller edge tile).
fn crop(t: &Tensor, keep: i64) -> Result<Tensor> {
    let size = t.size();
    Ok(t.f_narrow(2, 0, keep.min(size[2]))?
        .f_narrow(3, 0, keep.min(size[3]))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn no_stop() -> Result<()> {
        Ok(())
    }

    /// A pointwise map gives the same result tiled or not (blending equal values is exact up
    /// to rounding), for any size and tile, so the tiles cover the output exactly once.
    #[test]
    fn pointwise_maps_come_out_whole_for_any_size() {
        let mut seed = 7u64;
        let mut next = |n: i64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as i64 % n
        };
        for _ in 0..40 {
            let (h, w) = (1 + next(40), 1 + next(40));
            let tile_in = 4 * (1 + next(5));
            let tiles = Tiles {
                tile_in,
                tile_out: tile_in * 2,
            };
            let x = Tensor::randn([1, 2, h, w], (Kind::Float, Device::Cpu));
            let up = |t: &Tensor| -> Result<Tensor> {
                Ok(t.f_repeat_interleave_self_int(2, Some(2), None)?
                    .f_repeat_interleave_self_int(2, Some(3), None)?
                    .f_mul_scalar(3.0)?)
            };
            let whole = up(&x).unwrap();
            let tiled = tiles.run(&x, up, &no_stop).unwrap();
            assert_eq!(tiled.size(), whole.size(), "{h}x{w} tile {tile_in}");
            let diff = f64::try_from((tiled - whole).abs().max()).unwrap();
            assert!(diff < 1e-5, "{h}x{w} tile {tile_in}: {diff}");
        }
    }

    /// The blend is diffusers' ramp: the first cell is all `a`, then `b` grows by 1/extent.
    #[test]
    fn blend_ramps_linearly_from_the_previous_tile() {
        let a = Tensor::full([1, 1, 4, 3], 10.0, (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([1, 1, 4, 5], (Kind::Float, Device::Cpu));
        let out = blend_into(&a, &b, 4, 3).unwrap();
        let row: Vec<f32> = Vec::try_from(out.get(0).get(0).get(0)).unwrap();
        // extent = min(4, 3, 5) = 3: weights of a are 1, 2/3, 1/3.
        let expected = [10.0, 10.0 * 2.0 / 3.0, 10.0 / 3.0, 0.0, 0.0];
        for (got, want) in row.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{row:?}");
        }
    }
}
