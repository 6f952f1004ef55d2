//! VGG's convolutions on the CPU, without burn's generic convolution: 3x3 "same"
//! convolutions by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016), the way cuDNN
//! and oneDNN run them. Each 2x2 output tile takes 16 multiplications per input/output channel
//! pair instead of 36, so the 3x3 convolutions need 2.25 times fewer multiplications; what is
//! left is 16 independent matrix multiplies per layer (one per position of the 4x4 transformed
//! tile), run by the same `gemm` crate burn's CPU backend uses, with the transforms fused with the
//! bias and the ReLU. It serves the frozen layers and, with the gradients below (the input's by
//! the same Winograd convolution with flipped kernels, the parameters' by one im2col product), the
//! trainable VGG convolutions of `train::hand`. Results agree with the direct convolution to
//! about 1e-6 relative.
//!
//! Layouts are planar, as burn's tensors: activations `[n][c][h][w]`, weights `[out][in][3][3]`.

use rayon::prelude::*;

/// Transformed tiles processed at once, in elements of the larger of the two channel counts:
/// bounds the two scratch buffers to 2^18 * 16 floats (16 MiB) each, whatever the batch (twice
/// that was no faster and cost 32 MiB more).
const CHUNK_ELEMENTS: usize = 1 << 18;

/// One 3x3 convolution (stride 1, padding 1) followed by a ReLU (unless `without_relu`), its
/// weights pre-transformed.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    cin: usize,
    cout: usize,
    /// `U = G g G^T` per output/input pair, laid out `[16][cout][cin]`.
    u: Vec<f32>,
    bias: Vec<f32>,
    relu: bool,
}

impl Conv3x3 {
    /// From burn's layout: `weight` `[cout][cin][3][3]`, `bias` `[cout]`.
    pub fn new(weight: &[f32], bias: &[f32], cout: usize, cin: usize) -> Self {
        assert_eq!(weight.len(), cout * cin * 9, "3x3 convolution weight");
        assert_eq!(bias.len(), cout, "convolution bias");
        let mut u = vec![0.0f32; 16 * cout * cin];
        // One output channel per task: it writes row o of each of the 16 `[cout][cin]` blocks.
        let up = SendPtr(u.as_mut_ptr());
        (0..cout).into_par_iter().for_each(|o| {
            let up = &up;
            for i in 0..cin {
                let g = &weight[(o * cin + i) * 9..][..9];
                // tmp = G g (4x3), then U = tmp G^T (4x4).
                let mut tmp = [[0.0f32; 3]; 4];
                for c in 0..3 {
                    let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                    tmp[0][c] = g0;
                    tmp[1][c] = 0.5 * (g0 + g1 + g2);
                    tmp[2][c] = 0.5 * (g0 - g1 + g2);
                    tmp[3][c] = g2;
                }
                for (r, t) in tmp.iter().enumerate() {
                    let row = [
                        t[0],
                        0.5 * (t[0] + t[1] + t[2]),
                        0.5 * (t[0] - t[1] + t[2]),
                        t[2],
                    ];
                    for (c, v) in row.into_iter().enumerate() {
                        // SAFETY: inside u (r, c < 4, o < cout, i < cin), written by task o
                        // only, while u lives.
                        unsafe { *up.0.add(((r * 4 + c) * cout + o) * cin + i) = v };
                    }
                }
            }
        });
        Self {
            cin,
            cout,
            u,
            bias: bias.to_vec(),
            relu: true,
        }
    }

    /// The same convolution without the ReLU (`conv(x) + bias`).
    pub fn without_relu(mut self) -> Self {
        self.relu = false;
        self
    }

    /// The convolution that carries a gradient back to the input: from `weight` `[cout][cin][3][3]`,
    /// the `[cin][cout]` kernels flipped in both directions, no bias, no ReLU. For a stride 1,
    /// padding 1 convolution `d loss / d x = backward_input(w).forward(d loss / d z)`.
    pub fn backward_input(weight: &[f32], cout: usize, cin: usize) -> Self {
        assert_eq!(weight.len(), cout * cin * 9, "3x3 convolution weight");
        let mut flipped = vec![0.0f32; cout * cin * 9];
        for o in 0..cout {
            for i in 0..cin {
                let from = &weight[(o * cin + i) * 9..][..9];
                let to = &mut flipped[(i * cout + o) * 9..][..9];
                for k in 0..9 {
                    to[k] = from[8 - k];
                }
            }
        }
        Self::new(&flipped, &vec![0.0; cin], cin, cout).without_relu()
    }

    /// `relu(conv(x) + bias)` (or without the ReLU) for a batch `[n][cin][h][w]`; returns
    /// `[n][cout][h][w]`.
    pub fn forward(&self, x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; n * self.cout * h * w];
        let mut scratch = vec![0.0f32; Self::scratch_len(self.cin, self.cout, [n, h, w])];
        self.forward_into(x, [n, h, w], &mut y, &mut scratch);
        y
    }

    /// How many floats of scratch [`Conv3x3::forward_into`] needs for a `cin` to `cout`
    /// convolution of a batch `[n, h, w]`: the transformed tiles of one chunk, 16 MiB at most.
    pub fn scratch_len(cin: usize, cout: usize, dims: [usize; 3]) -> usize {
        Plan::new(cin, cout, dims).scratch(cin, cout)
    }

    /// [`Conv3x3::forward`] into `y` (`[n][cout][h][w]`, every element overwritten), with
    /// `scratch` (at least [`Conv3x3::scratch_len`] floats, whatever they hold) for the
    /// transformed tiles: a caller that runs layer after layer gives the same buffers to each.
    pub fn forward_into(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        y: &mut [f32],
        scratch: &mut [f32],
    ) {
        let plan = Plan::new(self.cin, self.cout, [n, h, w]);
        self.forward_planned(x, [n, h, w], y, scratch, &plan);
    }

    /// [`Conv3x3::forward_into`] the way `plan` says (tests give every kind).
    fn forward_planned(
        &self,
        x: &[f32],
        [n, h, w]: [usize; 3],
        y: &mut [f32],
        scratch: &mut [f32],
        plan: &Plan,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        assert_eq!(x.len(), n * cin * h * w, "convolution input");
        assert_eq!(y.len(), n * cout * h * w, "convolution output");
        let (tyn, txn) = (h.div_ceil(2), w.div_ceil(2));
        let tile_rows = n * tyn;
        assert!(
            scratch.len() >= plan.scratch(cin, cout),
            "convolution scratch"
        );
        let geo = Geometry {
            h,
            w,
            tyn,
            txn,
            planes_in: cin,
            planes_out: cout,
        };
        let yp = SendPtr(y.as_mut_ptr());
        let rows = plan.chunk / txn;
        if plan.private {
            // Every thread its own chunks, start to end, in its own part of the scratch.
            let part = plan.scratch(cin, cout) / plan.parts;
            let chunks = tile_rows.div_ceil(rows);
            scratch[..part * plan.parts]
                .par_chunks_mut(part)
                .enumerate()
                .for_each(|(t, mine)| {
                    for k in (t..chunks).step_by(plan.parts) {
                        let r0 = k * rows;
                        let len = (rows.min(tile_rows - r0)) * txn;
                        // SAFETY: chunk k writes only its own tile rows of y.
                        unsafe { self.chunk(&geo, x, (r0, len), mine, &yp, false) };
                    }
                });
        } else {
            let mut r0 = 0;
            while r0 < tile_rows {
                let len = plan.chunk.min((tile_rows - r0) * txn);
                // SAFETY: one chunk at a time, each parallel inside.
                unsafe { self.chunk(&geo, x, (r0, len), scratch, &yp, true) };
                r0 += len / txn;
            }
        }
    }

    /// The tile rows `r0..r0 + len / txn`: transformed input tiles, 16 products, output tiles
    /// written into `y`; each step over all threads (`parallel`), or all on this one.
    ///
    /// # Safety
    ///
    /// `y` points to the `[n][cout][h][w]` output; no other thread writes these tile rows;
    /// `scratch` holds `(cin + cout) 16 len` floats.
    unsafe fn chunk(
        &self,
        geo: &Geometry,
        x: &[f32],
        (r0, len): (usize, usize),
        scratch: &mut [f32],
        y: &SendPtr,
        parallel: bool,
    ) {
        let (cin, cout) = (self.cin, self.cout);
        // Every element of the parts of v and m in use is written before it is read.
        let (v, m) = scratch[..(cin + cout) * 16 * len].split_at_mut(cin * 16 * len);
        // V[c][xi][t]: the transformed input tiles, one channel per task.
        let input = |(c, out): (usize, &mut [f32])| geo.input_tiles(x, c, r0, len, out);
        if parallel {
            v.par_chunks_mut(16 * len).enumerate().for_each(input);
        } else {
            v.chunks_mut(16 * len).enumerate().for_each(input);
        }
        // M[o][xi][t] = sum_c U[xi][o][c] V[c][xi][t]: 16 independent products.
        let (mp, vp, up) = (
            SendPtr(m.as_mut_ptr()),
            SendPtr(v.as_mut_ptr()),
            SendPtr(self.u.as_ptr() as *mut f32),
        );
        let product = |xi: usize| {
            let (mp, vp, up) = (&mp, &vp, &up);
            // SAFETY: each xi writes its own rows of M (offset xi * len, row stride 16 len,
            // `len` columns), disjoint from every other xi's; V and U are only read; all
            // three buffers outlive the loop.
            unsafe {
                gemm::gemm(
                    cout,
                    len,
                    cin,
                    mp.0.add(xi * len),
                    1,
                    (16 * len) as isize,
                    false,
                    up.0.add(xi * cout * cin),
                    1,
                    cin as isize,
                    vp.0.add(xi * len),
                    1,
                    (16 * len) as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        if parallel {
            (0..16).into_par_iter().for_each(product);
        } else {
            (0..16).for_each(product);
        }
        // Back to 2x2 output tiles, plus bias, ReLU; one output channel per task.
        let output = |(o, mo): (usize, &[f32])| {
            // SAFETY: task o writes only the planes of output channel o, in these tile rows
            // (the caller's contract).
            unsafe { geo.output_tiles(mo, o, (self.bias[o], self.relu), r0, len, y.0) }
        };
        if parallel {
            m.par_chunks(16 * len).enumerate().for_each(output);
        } else {
            m.chunks(16 * len).enumerate().for_each(output);
        }
    }
}

/// Whether a `cin` to `cout` convolution of `[n, h, w]` has each thread run its own chunks of
/// tiles (small weights over many tiles), rather than one chunk at a time over all threads.
pub fn runs_per_thread(cin: usize, cout: usize, dims: [usize; 3]) -> bool {
    Plan::new(cin, cout, dims).private
}

#[derive(Debug)]
/// How a convolution goes through its tiles: in chunks of `chunk` tiles (whole rows of them),
/// one at a time over all threads, or (`private`) each thread its own chunks in its own part of
/// the scratch.
struct Plan {
    chunk: usize,
    private: bool,
    parts: usize,
}

impl Plan {
    fn new(cin: usize, cout: usize, [n, h, w]: [usize; 3]) -> Self {
        let txn = w.div_ceil(2);
        let rows = |elements: usize| (elements / txn).clamp(1, n * h.div_ceil(2)) * txn;
        let threads = rayon::current_num_threads();
        // Small weights (U within a thread's L2) over many tiles: each thread transforms,
        // multiplies and transforms back its own chunks, sized for its cache, with no
        // waiting on the others between the steps.
        let private_chunk = rows(PRIVATE_FLOATS / (16 * (cin + cout)));
        if cin * cout <= PRIVATE_WEIGHTS && n * h.div_ceil(2) * txn >= 2 * threads * private_chunk {
            Self {
                chunk: private_chunk,
                private: true,
                parts: threads,
            }
        } else {
            Self {
                chunk: rows(CHUNK_ELEMENTS / cin.max(cout)),
                private: false,
                parts: 1,
            }
        }
    }

    fn scratch(&self, cin: usize, cout: usize) -> usize {
        (cin + cout) * 16 * self.chunk * self.parts
    }
}

/// Transformed floats (input and output) of one thread's chunk when each thread runs its own.
const PRIVATE_FLOATS: usize = 1 << 19;

/// The largest `cin x cout` run one chunk per thread: 16 of them (U) are 1 MiB.
const PRIVATE_WEIGHTS: usize = 128 * 128;

/// Gradients of a 3x3 convolution's (stride 1, padding 1) weight `[cout][cin][3][3]` and bias
/// `[cout]` from its input `x` `[n][cin][h][w]` and the gradient `g` `[n][cout][h][w]` of its
/// output: one product of `g` `[cout, n h w]` with the input's 3x3 patches `[n h w, cin 9]`
/// (im2col, built in chunks of images to bound the scratch buffer to 64 MiB).
pub fn conv3x3_param_grads(x: &[f32], g: &[f32], dims: [usize; 5]) -> (Vec<f32>, Vec<f32>) {
    param_grads_in_chunks(x, g, dims, 16 << 20)
}

/// [`conv3x3_param_grads`] with im2col chunks of at most `budget` floats (at least one image).
fn param_grads_in_chunks(
    x: &[f32],
    g: &[f32],
    [n, cin, cout, h, w]: [usize; 5],
    budget: usize,
) -> (Vec<f32>, Vec<f32>) {
    let hw = h * w;
    assert_eq!(x.len(), n * cin * hw, "convolution input");
    assert_eq!(g.len(), n * cout * hw, "convolution output gradient");
    let db: Vec<f32> = (0..cout)
        .into_par_iter()
        .map(|o| {
            (0..n)
                .map(|b| g[(b * cout + o) * hw..][..hw].iter().sum::<f32>())
                .sum()
        })
        .collect();
    let k = cin * 9;
    let per_chunk = (budget / (k * hw).max(1)).clamp(1, n.max(1));
    let mut dw = vec![0.0f32; cout * k];
    let mut cols = vec![0.0f32; k * per_chunk * hw];
    let mut gt = vec![0.0f32; cout * per_chunk * hw];
    let mut first = true;
    for b0 in (0..n).step_by(per_chunk) {
        let nb = per_chunk.min(n - b0);
        let t = nb * hw;
        // cols[(c 9 + ky 3 + kx)][(b, y, x)] = x[b][c][y + ky - 1][x + kx - 1] (0 outside).
        cols[..k * t]
            .par_chunks_mut(t)
            .enumerate()
            .for_each(|(row, out)| {
                let (c, ky, kx) = (row / 9, row % 9 / 3, row % 3);
                for bb in 0..nb {
                    let plane = &x[((b0 + bb) * cin + c) * hw..][..hw];
                    let out = &mut out[bb * hw..][..hw];
                    for y in 0..h {
                        let line = &mut out[y * w..][..w];
                        let sy = y + ky;
                        if sy == 0 || sy > h {
                            line.fill(0.0);
                            continue;
                        }
                        let src = &plane[(sy - 1) * w..][..w];
                        match kx {
                            0 => {
                                line[0] = 0.0;
                                line[1..].copy_from_slice(&src[..w - 1]);
                            }
                            1 => line.copy_from_slice(src),
                            _ => {
                                line[..w - 1].copy_from_slice(&src[1..]);
                                line[w - 1] = 0.0;
                            }
                        }
                    }
                }
            });
        // gt[o][(b, p)] = g[b][o][p]
        gt[..cout * t]
            .par_chunks_mut(t)
            .enumerate()
            .for_each(|(o, out)| {
                for bb in 0..nb {
                    out[bb * hw..][..hw].copy_from_slice(&g[((b0 + bb) * cout + o) * hw..][..hw]);
                }
            });
        // dw[o][j] (+)= sum_t gt[o][t] cols[j][t]
        // SAFETY: dw is cout x k, gt is cout x t (row stride t), cols is k x t read as its
        // transpose (t x k: row stride 1, column stride t); all within their buffers, which do
        // not overlap.
        unsafe {
            gemm::gemm(
                cout,
                k,
                t,
                dw.as_mut_ptr(),
                1,
                k as isize,
                !first,
                gt.as_ptr(),
                1,
                t as isize,
                cols.as_ptr(),
                t as isize,
                1,
                if first { 0.0 } else { 1.0 },
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        first = false;
    }
    (dw, db)
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint regions of one buffer to rayon tasks (see the call sites).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Where the tiles of one layer sit in the batch. Tiles are numbered image by image, row by row;
/// a chunk always holds whole rows of tiles, so that the transforms run along rows (vectorised).
struct Geometry {
    h: usize,
    w: usize,
    tyn: usize,
    txn: usize,
    planes_in: usize,
    planes_out: usize,
}

impl Geometry {
    /// `out[xi * len + t] = (B^T d B)[xi]` for the 4x4 patch `d` of channel `c` under each tile
    /// `t` of the tile rows `r0..r0 + len / txn` (zero outside the image).
    fn input_tiles(&self, x: &[f32], c: usize, r0: usize, len: usize, out: &mut [f32]) {
        let (h, w, txn) = (self.h, self.w, self.txn);
        let wp = 2 * txn + 2;
        let mut rows = vec![0.0f32; 4 * wp];
        let mut b = vec![0.0f32; 4 * wp];
        for rr in 0..len / txn {
            let (n, ty) = ((r0 + rr) / self.tyn, (r0 + rr) % self.tyn);
            let plane = &x[(n * self.planes_in + c) * h * w..][..h * w];
            // The four input rows under this tile row, padded: column p holds input column p - 1.
            for (r, row) in rows.chunks_exact_mut(wp).enumerate() {
                let yy = (2 * ty + r) as isize - 1;
                if yy < 0 || yy as usize >= h {
                    row.fill(0.0);
                } else {
                    row[1..=w].copy_from_slice(&plane[yy as usize * w..][..w]);
                }
            }
            for row in rows.chunks_exact_mut(wp) {
                row[0] = 0.0;
                row[w + 1..].fill(0.0);
            }
            // Rows: B^T d, for every column at once.
            let (d0, rest) = rows.split_at(wp);
            let (d1, rest) = rest.split_at(wp);
            let (d2, d3) = rest.split_at(wp);
            let (b0, rest) = b.split_at_mut(wp);
            let (b1, rest) = rest.split_at_mut(wp);
            let (b2, b3) = rest.split_at_mut(wp);
            for p in 0..wp {
                b0[p] = d0[p] - d2[p];
                b1[p] = d1[p] + d2[p];
                b2[p] = d2[p] - d1[p];
                b3[p] = d1[p] - d3[p];
            }
            // Columns: (B^T d) B, tile by tile along the row.
            let at = rr * txn;
            for (r, br) in b.chunks_exact(wp).enumerate() {
                let dst = |k: usize| (r * 4 + k) * len + at;
                for (tx, o) in out[dst(0)..][..txn].iter_mut().enumerate() {
                    *o = br[2 * tx] - br[2 * tx + 2];
                }
                for (tx, o) in out[dst(1)..][..txn].iter_mut().enumerate() {
                    *o = br[2 * tx + 1] + br[2 * tx + 2];
                }
                for (tx, o) in out[dst(2)..][..txn].iter_mut().enumerate() {
                    *o = br[2 * tx + 2] - br[2 * tx + 1];
                }
                for (tx, o) in out[dst(3)..][..txn].iter_mut().enumerate() {
                    *o = br[2 * tx + 1] - br[2 * tx + 3];
                }
            }
        }
    }

    /// Writes `relu(A^T m A + bias)` (without the ReLU when `relu` is false) of every tile in `m`
    /// (`[16][len]`, output channel `o`, tile rows `r0..r0 + len / txn`) into the output planes
    /// of channel `o`.
    ///
    /// # Safety
    ///
    /// `y` points to `[n][planes_out][h][w]` floats; no other thread writes channel `o`.
    unsafe fn output_tiles(
        &self,
        m: &[f32],
        o: usize,
        (bias, relu): (f32, bool),
        r0: usize,
        len: usize,
        y: *mut f32,
    ) {
        let (h, w, txn) = (self.h, self.w, self.txn);
        let mut a = vec![0.0f32; 8 * txn];
        let mut line = vec![0.0f32; 2 * txn];
        for rr in 0..len / txn {
            let (n, ty) = ((r0 + rr) / self.tyn, (r0 + rr) % self.tyn);
            let at = rr * txn;
            let v = |xi: usize| &m[xi * len + at..][..txn];
            // Rows: A^T m, a[r * 4 + k][tx].
            for k in 0..4 {
                let (m0, m1, m2, m3) = (v(k), v(4 + k), v(8 + k), v(12 + k));
                let (lo, hi) = a.split_at_mut(4 * txn);
                let (a0, a1) = (&mut lo[k * txn..][..txn], &mut hi[k * txn..][..txn]);
                for tx in 0..txn {
                    a0[tx] = m0[tx] + m1[tx] + m2[tx];
                    a1[tx] = m1[tx] - m2[tx] - m3[tx];
                }
            }
            for r in 0..2 {
                let yy = 2 * ty + r;
                if yy >= h {
                    continue;
                }
                let q = |k: usize| &a[(r * 4 + k) * txn..][..txn];
                let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
                for tx in 0..txn {
                    line[2 * tx] = q0[tx] + q1[tx] + q2[tx] + bias;
                    line[2 * tx + 1] = q1[tx] - q2[tx] - q3[tx] + bias;
                }
                if relu {
                    line.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                // SAFETY: row yy of channel o's plane of image n (caller's contract).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        line.as_ptr(),
                        y.add((n * self.planes_out + o) * h * w + yy * w),
                        w,
                    )
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3x3 same convolution + bias + ReLU, the definition.
    #[allow(clippy::too_many_arguments)] // the definition, with every dimension named
    fn direct(
        x: &[f32],
        wt: &[f32],
        b: &[f32],
        n: usize,
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
    ) -> Vec<f32> {
        let mut y = vec![0.0f32; n * cout * h * w];
        for i in 0..n {
            for o in 0..cout {
                for r in 0..h {
                    for c in 0..w {
                        let mut s = b[o] as f64;
                        for k in 0..cin {
                            for dy in 0..3 {
                                for dx in 0..3 {
                                    let (yy, xx) = (
                                        r as isize + dy as isize - 1,
                                        c as isize + dx as isize - 1,
                                    );
                                    if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w
                                    {
                                        s += (x
                                            [((i * cin + k) * h + yy as usize) * w + xx as usize]
                                            * wt[((o * cin + k) * 3 + dy) * 3 + dx])
                                            as f64;
                                    }
                                }
                            }
                        }
                        y[((i * cout + o) * h + r) * w + c] = (s as f32).max(0.0);
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let z = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503));
                ((z >> 8) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn reused_buffers_give_what_fresh_ones_give_whatever_they_held() {
        // The buffers hold NaN, then an earlier layer's values, where this one writes; nothing
        // of them may show through.
        let mut y = vec![f32::NAN; 4000];
        let mut scratch = vec![f32::NAN; 20_000];
        for &(n, cin, cout, h, w) in &[(2, 3, 5, 7, 6), (1, 2, 3, 3, 5), (3, 4, 6, 9, 8)] {
            let x = values(n * cin * h * w, 4);
            let conv = Conv3x3::new(&values(cout * cin * 9, 5), &values(cout, 6), cout, cin);
            let y = &mut y[..n * cout * h * w];
            assert!(Conv3x3::scratch_len(cin, cout, [n, h, w]) <= scratch.len());
            conv.forward_into(&x, [n, h, w], y, &mut scratch);
            assert_eq!(y, conv.forward(&x, n, h, w), "{n}x{cin}->{cout} {h}x{w}");
        }
    }

    #[test]
    fn winograd_matches_the_direct_convolution_on_odd_and_even_sizes() {
        for &(n, cin, cout, h, w) in &[
            (2, 3, 5, 7, 6),
            (1, 4, 3, 1, 1),
            (3, 2, 2, 5, 9),
            (1, 8, 4, 2, 3),
        ] {
            let x = values(n * cin * h * w, 1);
            let wt = values(cout * cin * 9, 2);
            let b = values(cout, 3);
            let want = direct(&x, &wt, &b, n, cin, cout, h, w);
            let conv = Conv3x3::new(&wt, &b, cout, cin);
            let got = conv.forward(&x, n, h, w);
            for (k, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{n}x{cin}->{cout} {h}x{w} at {k}: {g} vs {e}"
                );
            }
            // Every way through the tiles gives the same values.
            for plan in every_plan(cin, cout, [n, h, w]) {
                assert_eq!(planned(&conv, &x, [n, h, w], &plan), got, "{plan:?}");
            }
        }
    }

    /// Ways through the tiles of `[n, h, w]`: the one chosen, and chunks of one and two rows of
    /// tiles, one at a time over all threads, or each of 1 to 3 parts of the scratch its own.
    fn every_plan(cin: usize, cout: usize, [n, h, w]: [usize; 3]) -> Vec<Plan> {
        let txn = w.div_ceil(2);
        let rows = n * h.div_ceil(2);
        let mut all = vec![Plan::new(cin, cout, [n, h, w])];
        for chunk in [txn, (2 * txn).min(rows * txn)] {
            all.push(Plan {
                chunk,
                private: false,
                parts: 1,
            });
            for parts in 1..=3 {
                all.push(Plan {
                    chunk,
                    private: true,
                    parts,
                });
            }
        }
        all
    }

    fn planned(conv: &Conv3x3, x: &[f32], [n, h, w]: [usize; 3], plan: &Plan) -> Vec<f32> {
        let mut y = vec![f32::NAN; n * conv.cout * h * w];
        let mut scratch = vec![f32::NAN; plan.scratch(conv.cin, conv.cout)];
        conv.forward_planned(x, [n, h, w], &mut y, &mut scratch, plan);
        y
    }

    #[test]
    fn each_thread_on_its_own_chunks_gives_what_all_threads_on_each_give() {
        let (n, cin, cout, h, w) = (2, 16, 24, 64, 61);
        let conv = Conv3x3::new(&values(cout * cin * 9, 1), &values(cout, 2), cout, cin);
        let x = values(n * cin * h * w, 3);
        let want = planned(
            &conv,
            &x,
            [n, h, w],
            &Plan {
                chunk: n * h.div_ceil(2) * w.div_ceil(2),
                private: false,
                parts: 1,
            },
        );
        assert!(want.iter().any(|v| *v > 0.0) && want.iter().all(|v| v.is_finite()));
        for plan in every_plan(cin, cout, [n, h, w]) {
            assert_eq!(planned(&conv, &x, [n, h, w], &plan), want, "{plan:?}");
        }
        // VGG's first block is run that way (on up to 250 threads), its later ones not.
        assert!(Plan::new(64, 64, [20, 150, 150]).private);
        assert!(!Plan::new(256, 256, [20, 37, 37]).private);
    }

    #[test]
    fn chunks_smaller_than_the_batch_give_the_same_result() {
        // 3 images of 130x130 are 195 rows of 65 tiles; the chunks are 7 rows (2^19 / (16 x 66)
        // tiles, each thread its own) or, on many threads, 63 (2^18 / 64 tiles).
        let (n, cin, cout, h, w) = (3, 2, 64, 130, 130);
        let x = values(n * cin * h * w, 4);
        let wt = values(cout * cin * 9, 5);
        let b = values(cout, 6);
        let conv = Conv3x3::new(&wt, &b, cout, cin);
        let whole = conv.forward(&x, n, h, w);
        let per_image: Vec<f32> = (0..n)
            .flat_map(|i| conv.forward(&x[i * cin * h * w..][..cin * h * w], 1, h, w))
            .collect();
        assert_eq!(whole, per_image);
        assert!(whole.iter().any(|v| *v > 0.0));
    }

    #[test]
    fn parameter_gradients_match_the_direct_sums_in_one_chunk_or_many() {
        let [n, cin, cout, h, w] = [3, 2, 3, 5, 4];
        let x = values(n * cin * h * w, 7);
        let g = values(n * cout * h * w, 8);
        // dW[o][c][dy][dx] = sum over images and outputs of g * the input under that tap.
        let mut want = vec![0.0f64; cout * cin * 9];
        let mut want_b = vec![0.0f64; cout];
        for i in 0..n {
            for o in 0..cout {
                for r in 0..h {
                    for q in 0..w {
                        let go = g[((i * cout + o) * h + r) * w + q] as f64;
                        want_b[o] += go;
                        for c in 0..cin {
                            for dy in 0..3 {
                                for dx in 0..3 {
                                    let (yy, xx) = (r + dy, q + dx);
                                    if yy >= 1 && xx >= 1 && yy <= h && xx <= w {
                                        let v = x[((i * cin + c) * h + yy - 1) * w + xx - 1];
                                        want[((o * cin + c) * 3 + dy) * 3 + dx] += go * v as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let per_image = cin * 9 * h * w;
        for budget in [1, per_image, 2 * per_image, 1 << 24] {
            let (dw, db) = param_grads_in_chunks(&x, &g, [n, cin, cout, h, w], budget);
            for (a, b) in dw.iter().zip(&want).chain(db.iter().zip(&want_b)) {
                assert!((*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn the_input_gradient_is_the_flipped_convolution_of_the_output_gradient() {
        // <conv(x), g> = <x, backward_input(g)> for every x and g: the adjoint.
        let [n, cin, cout, h, w] = [2, 3, 4, 5, 6];
        let wt = values(cout * cin * 9, 3);
        let x = values(n * cin * h * w, 4);
        let g = values(n * cout * h * w, 5);
        let y = Conv3x3::new(&wt, &vec![0.0; cout], cout, cin)
            .without_relu()
            .forward(&x, n, h, w);
        let dx = Conv3x3::backward_input(&wt, cout, cin).forward(&g, n, h, w);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p * q) as f64).sum::<f64>();
        let (l, r) = (dot(&y, &g), dot(&x, &dx));
        assert!((l - r).abs() < 1e-4 * l.abs().max(1.0), "{l} vs {r}");
    }
}
