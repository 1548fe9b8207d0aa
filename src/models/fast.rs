//! The opt-in fast modes of the UNet, each trading some fidelity for speed; all are off by
//! default and an exact pass never touches this code.
//! - Step caching (DeepCache, Ma et al. 2023): the deep features change slowly from one step to
//!   the next, so a full pass stores the up path's input at one skip connection and the
//!   following passes recompute only the shallow layers around it.
//! - Token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023): self-attention at the
//!   finest resolution that has attention (the full latent resolution in SD 1.x / 2.x, ToMe's
//!   default there) runs on fewer tokens, each merged token the mean of similar ones, and its
//!   output is copied back to every token it stands for.
//! - Int8 linear layers ([`super::int8`]): dynamic quantization of the UNet's linear layers.
use crate::{Error, Result};
use tch::{Kind, Tensor};

/// Why a backend without the fast modes refuses them.
pub const NEEDS_NATIVE_UNET: &str = "the fast modes (step caching, token merging, int8 linear \
     layers) need the native UNet, not a TorchScript module";

/// Step caching state of one run: which skip connection the shallow passes stop at, and the
/// deep features the last full pass left there.
#[derive(Debug)]
pub struct DeepCache {
    branch: usize,
    features: Option<Tensor>,
}

impl DeepCache {
    /// `branch` counts the UNet's skip connections from the input side: 0 is the output of
    /// `conv_in`, the shallowest and fastest choice.
    pub fn new(branch: usize) -> Self {
        Self {
            branch,
            features: None,
        }
    }

    pub fn branch(&self) -> usize {
        self.branch
    }

    pub(crate) fn store(&mut self, features: &Tensor) {
        self.features = Some(features.shallow_clone());
    }

    /// The stored features, which must have the batch of the pass that reuses them.
    pub(crate) fn features(&self, batch: i64) -> Result<Tensor> {
        let f = self.features.as_ref().ok_or_else(|| {
            Error::Internal("step caching: a shallow pass ran before any full pass".into())
        })?;
        if f.size().first() != Some(&batch) {
            return Err(Error::Internal(format!(
                "step caching: the cached features have shape {:?}, the pass has batch {batch}",
                f.size()
            )));
        }
        Ok(f.shallow_clone())
    }
}

/// Token merging settings of one UNet call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenMerging {
    /// Fraction of the self-attention tokens merged away, in `[0, 0.75]`.
    pub ratio: f64,
    /// Chooses the destination token of each 2x2 cell; the same seed gives the same choice.
    pub seed: u64,
}

/// What one UNet call does beyond the exact forward pass.
#[derive(Debug, Default)]
pub struct FastPass<'a> {
    /// Step caching, and whether this call reuses the cached features (`true`) or is a full
    /// pass that refreshes them.
    pub cache: Option<(&'a mut DeepCache, bool)>,
    pub token_merging: Option<TokenMerging>,
    /// The linear layers in int8 ([`super::int8`]; float32 weights on the CPU only).
    pub int8_linear: bool,
}

impl FastPass<'_> {
    /// Nothing asked beyond the exact pass.
    pub fn is_exact(&self) -> bool {
        self.cache.is_none()
            && self.token_merging.map_or(true, |m| m.ratio <= 0.0)
            && !self.int8_linear
    }
}

/// One bipartite soft matching of ToMe over tokens laid out on an `h x w` grid: which tokens
/// merge into which, to be applied by [`TokenMerge::merge`] and undone by
/// [`TokenMerge::unmerge`].
pub struct TokenMerge {
    /// Destination positions in the grid (one per 2x2 cell).
    dst_idx: Tensor,
    /// Per batch, grid positions: of the sources kept apart, of those merged, and the
    /// destination (its index among `dst_idx`) each merged source joins.
    unmerged: Tensor,
    merged: Tensor,
    merged_into: Tensor,
    /// Per batch and grid position: the row of the merged tokens that stands for it.
    row_of: Tensor,
}
/// Splitmix64: the destination choices come from the seed alone, never from libtorch's global
/// generator (which seeded runs own).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TokenMerge {
    /// Matches the tokens of `metric` `[b, h*w, c]`: one random destination per 2x2 cell
    /// (cells cut off by an odd side have none), every other token a source joined to its most
    /// cosine-similar destination, and the `ratio * h * w` most similar sources merged.
    /// `None` when nothing would merge.
    pub fn new(metric: &Tensor, h: i64, w: i64, ratio: f64, seed: u64) -> Result<Option<Self>> {
        let (_, n, _) = metric.size3()?;
        if n != h * w {
            return Err(Error::Internal(format!(
                "token merging: {n} tokens for a {h}x{w} grid"
            )));
        }
        let (cells_y, cells_x) = (h / 2, w / 2);
        let num_dst = cells_y * cells_x;
        let r = ((n as f64 * ratio) as i64).min(n - num_dst);
        if r <= 0 || num_dst == 0 {
            return Ok(None);
        }
        // Positions: destinations first, then the sources in grid order.
        let mut is_dst = vec![false; n as usize];
        let mut state = seed;
        for cy in 0..cells_y {
            for cx in 0..cells_x {
                let k = (splitmix(&mut state) % 4) as i64;
                let (y, x) = (2 * cy + k / 2, 2 * cx + k % 2);
                is_dst[(y * w + x) as usize] = true;
            }
        }
        let positions =
            |want: bool| -> Vec<i64> { (0..n).filter(|&i| is_dst[i as usize] == want).collect() };
        let device = metric.device();
        let dst_idx = Tensor::from_slice(&positions(true)).f_to_device(device)?;
        let src_idx = Tensor::from_slice(&positions(false)).f_to_device(device)?;

        let normed = metric.f_to_kind(Kind::Float)?.f_div(
            &metric
                .f_to_kind(Kind::Float)?
                .f_norm_scalaropt_dim(2, [-1i64].as_slice(), true)?,
        )?;
        let src = normed.f_index_select(1, &src_idx)?;
        let dst = normed.f_index_select(1, &dst_idx)?;
        let scores = src.f_matmul(&dst.f_transpose(-1, -2)?)?;
        let (best, best_dst) = scores.f_max_dim(-1, false)?;
        // Sources by decreasing similarity: the first r merge, the rest stay apart.
        let order = best.f_argsort_stable(true, -1, true)?;
        let b = metric.size()[0];
        let num_src = n - num_dst;
        let src_rows = src_idx.f_unsqueeze(0)?.f_expand([b, num_src], false)?;
        let merged_order = order.f_narrow(1, 0, r)?;
        let unmerged_order = order.f_narrow(1, r, num_src - r)?;
        let merged = src_rows.f_gather(1, &merged_order, false)?;
        let unmerged = src_rows.f_gather(1, &unmerged_order, false)?;
        let merged_into = best_dst.f_gather(1, &merged_order, false)?;
        // Rows of the merged tokens: the unmerged sources first, then the destinations.
        let unm_len = num_src - r;
        let long = (Kind::Int64, device);
        let row_of = Tensor::f_zeros([b, n], long)?;
        let row_of = row_of.f_scatter(
            1,
            &unmerged,
            &Tensor::f_arange(unm_len, long)?.f_expand([b, unm_len], false)?,
        )?;
        let dst_rows = Tensor::f_arange_start(unm_len, unm_len + num_dst, long)?;
        let row_of = row_of.f_scatter(
            1,
            &dst_idx.f_unsqueeze(0)?.f_expand([b, num_dst], false)?,
            &dst_rows.f_unsqueeze(0)?.f_expand([b, num_dst], false)?,
        )?;
        let row_of = row_of.f_scatter(1, &merged, &merged_into.f_add_scalar(unm_len)?)?;
        Ok(Some(Self {
            dst_idx,
            unmerged,
            merged,
            merged_into,
            row_of,
        }))
    }

    /// Tokens after merging: `n - r`.
    pub fn merged_len(&self) -> i64 {
        self.unmerged.size()[1] + self.dst_idx.size()[0]
    }

    /// `[b, n, c]` to `[b, n - r, c]`: the unmerged sources, then each destination averaged
    /// with the sources merged into it.
    pub fn merge(&self, x: &Tensor) -> Result<Tensor> {
        let (b, _, c) = x.size3()?;
        let expand = |idx: &Tensor| -> Result<Tensor> {
            Ok(idx
                .f_unsqueeze(-1)?
                .f_expand([b, idx.size()[1], c], false)?)
        };
        let unm = x.f_gather(1, &expand(&self.unmerged)?, false)?;
        let moving = x.f_gather(1, &expand(&self.merged)?, false)?;
        let dst = x
            .f_index_select(1, &self.dst_idx)?
            .f_internal_scatter_reduce(1, &expand(&self.merged_into)?, &moving, "mean", true)?;
        Ok(Tensor::f_cat(&[unm, dst], 1)?)
    }

    /// `[b, n - r, c]` back to `[b, n, c]`: every token takes the output of what it was
    /// merged into (itself when unmerged).
    pub fn unmerge(&self, y: &Tensor) -> Result<Tensor> {
        let (b, _, c) = y.size3()?;
        let index = self
            .row_of
            .f_unsqueeze(-1)?
            .f_expand([b, self.row_of.size()[1], c], false)?;
        Ok(y.f_gather(1, &index, false)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid_tokens(b: i64, h: i64, w: i64, c: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([b, h * w, c], (Kind::Float, tch::Device::Cpu))
    }

    #[test]
    fn merging_counts_and_round_trips_on_cellwise_constant_tokens() {
        // Tokens equal within each 2x2 cell: every source matches its own cell's destination
        // exactly, so merging them all loses nothing and unmerging gives the input back.
        for (h, w) in [(4, 4), (6, 8), (8, 6), (2, 2)] {
            let (b, c) = (2, 5);
            let cells = grid_tokens(b, h / 2, w / 2, c, h * 10 + w)
                .reshape([b, h / 2, 1, w / 2, 1, c])
                .expand([b, h / 2, 2, w / 2, 2, c], false)
                .reshape([b, h * w, c]);
            let n = h * w;
            let m = TokenMerge::new(&cells, h, w, 0.75, 7).unwrap().unwrap();
            assert_eq!(m.merged_len(), n / 4);
            let merged = m.merge(&cells).unwrap();
            assert_eq!(merged.size(), [b, n / 4, c]);
            let back = m.unmerge(&merged).unwrap();
            let err = f64::try_from((&back - &cells).abs().max()).unwrap();
            assert!(err < 1e-6, "{h}x{w}: round trip differs by {err}");
        }
    }

    #[test]
    fn unmerging_gives_each_group_its_mean_as_a_direct_computation_does() {
        // Reference: the matching done token by token in plain Rust (cosine similarity, best
        // destination per source, the r most similar sources merged), and every member of a
        // group holding the group's mean after merge + unmerge.
        for seed in 0..24u64 {
            let h = 2 + (seed % 5) as i64 * 2 + (seed % 2) as i64;
            let w = 4 + (seed % 3) as i64;
            let (b, c) = (2i64, 3i64);
            let x = grid_tokens(b, h, w, c, seed as i64);
            let ratio = 0.15 + (seed % 6) as f64 * 0.1;
            let Some(m) = TokenMerge::new(&x, h, w, ratio, seed).unwrap() else {
                panic!("seed {seed}: nothing merged");
            };
            let n = h * w;
            let r = n - m.merged_len();
            let dst: Vec<i64> = Vec::try_from(&m.dst_idx).unwrap();
            let src: Vec<i64> = (0..n).filter(|i| !dst.contains(i)).collect();
            assert_eq!(dst.len() as i64, (h / 2) * (w / 2));
            assert_eq!(r, ((n as f64 * ratio) as i64).min(src.len() as i64));
            let back = m.unmerge(&m.merge(&x).unwrap()).unwrap();
            for bi in 0..b {
                let tok = |i: i64| -> Vec<f64> {
                    Vec::try_from(x.get(bi).get(i).to_kind(Kind::Double)).unwrap()
                };
                let unit = |v: Vec<f64>| {
                    let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
                    v.into_iter().map(|a| a / norm).collect::<Vec<_>>()
                };
                let mut best = Vec::new();
                for (si, &s) in src.iter().enumerate() {
                    let a = unit(tok(s));
                    let (mut top, mut arg) = (f64::NEG_INFINITY, 0);
                    for (di, &d) in dst.iter().enumerate() {
                        let score: f64 = a.iter().zip(unit(tok(d))).map(|(p, q)| p * q).sum();
                        if score > top {
                            (top, arg) = (score, di);
                        }
                    }
                    best.push((top, si, arg));
                }
                best.sort_by(|p, q| q.0.partial_cmp(&p.0).unwrap());
                let mut groups: Vec<Vec<i64>> = dst.iter().map(|&d| vec![d]).collect();
                for &(_, si, di) in &best[..r as usize] {
                    groups[di].push(src[si]);
                }
                let mut expected: Vec<Vec<f64>> = (0..n).map(tok).collect();
                for g in &groups {
                    let mut mean = vec![0.0; c as usize];
                    for &i in g {
                        for (acc, v) in mean.iter_mut().zip(tok(i)) {
                            *acc += v / g.len() as f64;
                        }
                    }
                    for &i in g {
                        expected[i as usize] = mean.clone();
                    }
                }
                for i in 0..n {
                    let got: Vec<f64> =
                        Vec::try_from(back.get(bi).get(i).to_kind(Kind::Double)).unwrap();
                    for (g, e) in got.iter().zip(&expected[i as usize]) {
                        assert!((g - e).abs() < 1e-5, "seed {seed} batch {bi} token {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn nothing_merges_at_ratio_zero_or_on_a_grid_without_cells() {
        let x = grid_tokens(1, 4, 4, 3, 1);
        assert!(TokenMerge::new(&x, 4, 4, 0.0, 0).unwrap().is_none());
        let x = grid_tokens(1, 1, 5, 3, 1);
        assert!(TokenMerge::new(&x, 1, 5, 0.5, 0).unwrap().is_none());
    }
}
