//! VGG's convolutions on the CPU, without burn's generic convolution: 3x3 "same"
//! convolutions by Winograd's minimal filtering (Lavin & Gray, 2016), the way cuDNN and oneDNN
//! run them. F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input patch with 36
//! multiplications per input/output channel pair where the direct convolution takes 144 (4x
//! fewer); F(2x2, 3x3), 16 for a 2x2 tile instead of 36 (2.25x), serves maps too small for 4x4
//! tiles and layers with few channels ([`Tile::for_layer`]). What is left is 36 (or 16)
//! independent matrix multiplies per layer, one per position of the transformed tile, run by the
//! same `gemm` crate burn's CPU backend uses, with the transforms fused with the bias and the
//! ReLU. It serves the frozen layers and, with the gradients below (the input's by the same
//! Winograd convolution with flipped kernels, the parameters' by one im2col product), the
//! trainable VGG convolutions of `train::hand`. F(2x2) agrees with the direct convolution to
//! about 1e-6 relative, F(4x4) to about 1e-5 (its transforms multiply by up to 8 and divide by
//! up to 24).
//!
//! Layouts are planar, as burn's tensors: activations `[n][c][h][w]`, weights `[out][in][3][3]`.

use rayon::prelude::*;

/// Transformed floats of one chunk, in each of the two scratch buffers (input and output
/// tiles), per channel of the larger of the two counts: 2^22 floats (16 MiB) each, whatever the
/// batch (twice that was no faster and cost 32 MiB more).
const CHUNK_FLOATS: usize = 1 << 22;

/// `G` of F(4x4, 3x3)'s `U = G g G^T`.
const G4: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// The fewest `cin x cout` channel pairs [`Tile::for_layer`] gives F(4x4) to.
const MANY_CHANNELS: usize = 128 * 256;

/// Winograd's output tile: `F(m x m, 3x3)` computes an `m x m` tile of the output from an
/// `(m + 2) x (m + 2)` patch of the input with `(m + 2)^2` products per channel pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// F(2x2, 3x3): 16 products per 4 outputs.
    F2,
    /// F(4x4, 3x3): 36 products per 16 outputs.
    F4,
}

impl Tile {
    /// The side of an output tile.
    pub fn size(self) -> usize {
        match self {
            Self::F2 => 2,
            Self::F4 => 4,
        }
    }

    /// Positions of a transformed tile: the independent products per layer.
    pub fn points(self) -> usize {
        (self.size() + 2) * (self.size() + 2)
    }

    /// Multiplications (one multiply-add each) of the products for a `cin` to `cout`
    /// convolution of one `h x w` map.
    pub fn multiplies(self, cin: usize, cout: usize, [h, w]: [usize; 2]) -> f64 {
        let m = self.size();
        (self.points() * cin * cout * h.div_ceil(m) * w.div_ceil(m)) as f64
    }

    /// The tile a `cin` to `cout` convolution of `h x w` maps runs fastest with: F(4x4) where
    /// the channels are many (at least 128 x 256: there its products save more than its larger
    /// transforms cost) and the map is large enough that its 4x4 tiles need fewer
    /// multiplications than 2x2 ones; else F(2x2). Measured per layer with
    /// `runner bench-workload vgg16_layers` (both tiles, every VGG16 layer, 2 threads, AVX-512):
    /// F(4x4) took 2 to 20 % less time from block3_conv1 on, 4 to 39 % more on block1 and
    /// block2 (3 to 128 channels).
    pub fn for_layer(cin: usize, cout: usize, [h, w]: [usize; 2]) -> Self {
        let fewer = Self::F4.multiplies(1, 1, [h, w]) < Self::F2.multiplies(1, 1, [h, w]);
        if cin * cout >= MANY_CHANNELS && fewer {
            Self::F4
        } else {
            Self::F2
        }
    }
}

/// One 3x3 convolution (stride 1, padding 1) followed by a ReLU (unless `without_relu`), its
/// weights pre-transformed.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    cin: usize,
    cout: usize,
    tile: Tile,
    /// `U = G g G^T` per output/input pair, laid out `[points][cout][cin]`.
    u: Vec<f32>,
    bias: Vec<f32>,
    relu: bool,
}

impl Conv3x3 {
    /// From burn's layout: `weight` `[cout][cin][3][3]`, `bias` `[cout]`, by `tile` (no default:
    /// [`Tile::for_layer`] picks the fastest for a frozen layer; training keeps F(2x2)).
    pub fn with_tile(weight: &[f32], bias: &[f32], cout: usize, cin: usize, tile: Tile) -> Self {
        assert_eq!(weight.len(), cout * cin * 9, "3x3 convolution weight");
        assert_eq!(bias.len(), cout, "convolution bias");
        let u = match tile {
            Tile::F2 => weights_f2(weight, cout, cin),
            Tile::F4 => weights_f4(weight, cout, cin),
        };
        Self {
            cin,
            cout,
            tile,
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
    pub fn backward_input(weight: &[f32], cout: usize, cin: usize, tile: Tile) -> Self {
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
        Self::with_tile(&flipped, &vec![0.0; cin], cin, cout, tile).without_relu()
    }

    /// `relu(conv(x) + bias)` (or without the ReLU) for a batch `[n][cin][h][w]`; returns
    /// `[n][cout][h][w]`.
    pub fn forward(&self, x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; n * self.cout * h * w];
        let mut scratch = vec![0.0f32; self.scratch_len([n, h, w])];
        self.forward_into(x, [n, h, w], &mut y, &mut scratch);
        y
    }

    /// How many floats of scratch [`Conv3x3::forward_into`] needs for a batch `[n, h, w]`: the
    /// transformed tiles of one chunk, 32 MiB at most.
    pub fn scratch_len(&self, dims: [usize; 3]) -> usize {
        self.plan(dims).scratch(self.cin, self.cout)
    }

    /// Whether a batch `[n, h, w]` has each thread run its own chunks of tiles (small weights
    /// over many tiles), rather than one chunk at a time over all threads.
    pub fn runs_per_thread(&self, dims: [usize; 3]) -> bool {
        self.plan(dims).private
    }

    fn plan(&self, dims: [usize; 3]) -> Plan {
        Plan::new(self.tile, self.cin, self.cout, dims)
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
        let plan = self.plan([n, h, w]);
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
        let m = self.tile.size();
        let (tyn, txn) = (h.div_ceil(m), w.div_ceil(m));
        let tile_rows = n * tyn;
        assert!(
            scratch.len() >= plan.scratch(cin, cout),
            "convolution scratch"
        );
        let geo = Geometry {
            tile: self.tile,
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

    /// The tile rows `r0..r0 + len / txn`: transformed input tiles, the products, output tiles
    /// written into `y`; each step over all threads (`parallel`), or all on this one.
    ///
    /// # Safety
    ///
    /// `y` points to the `[n][cout][h][w]` output; no other thread writes these tile rows;
    /// `scratch` holds `(cin + cout) points len` floats.
    unsafe fn chunk(
        &self,
        geo: &Geometry,
        x: &[f32],
        (r0, len): (usize, usize),
        scratch: &mut [f32],
        y: &SendPtr,
        parallel: bool,
    ) {
        let (cin, cout, points) = (self.cin, self.cout, self.tile.points());
        // Every element of the parts of v and m in use is written before it is read.
        let (v, m) = scratch[..(cin + cout) * points * len].split_at_mut(cin * points * len);
        // V[c][xi][t]: the transformed input tiles, one channel per task.
        let input = |(c, out): (usize, &mut [f32])| geo.input_tiles(x, c, r0, len, out);
        if parallel {
            v.par_chunks_mut(points * len).enumerate().for_each(input);
        } else {
            v.chunks_mut(points * len).enumerate().for_each(input);
        }
        // M[o][xi][t] = sum_c U[xi][o][c] V[c][xi][t]: `points` independent products.
        let (mp, vp, up) = (
            SendPtr(m.as_mut_ptr()),
            SendPtr(v.as_mut_ptr()),
            SendPtr(self.u.as_ptr() as *mut f32),
        );
        let product = |xi: usize| {
            let (mp, vp, up) = (&mp, &vp, &up);
            // SAFETY: each xi writes its own rows of M (offset xi * len, row stride points len,
            // `len` columns), disjoint from every other xi's; V and U are only read; all
            // three buffers outlive the loop.
            unsafe {
                gemm::gemm(
                    cout,
                    len,
                    cin,
                    mp.0.add(xi * len),
                    1,
                    (points * len) as isize,
                    false,
                    up.0.add(xi * cout * cin),
                    1,
                    cin as isize,
                    vp.0.add(xi * len),
                    1,
                    (points * len) as isize,
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
            (0..points).into_par_iter().for_each(product);
        } else {
            (0..points).for_each(product);
        }
        // Back to output tiles, plus bias, ReLU; one output channel per task, each thread
        // with one work buffer for all its channels.
        let output = |work: &mut Vec<f32>, (o, mo): (usize, &[f32])| {
            // SAFETY: task o writes only the planes of output channel o, in these tile rows
            // (the caller's contract).
            unsafe { geo.output_tiles(mo, o, (self.bias[o], self.relu), (r0, len), y.0, work) }
        };
        if parallel {
            m.par_chunks(points * len)
                .enumerate()
                .for_each_init(Vec::new, output);
        } else {
            let mut work = Vec::new();
            for task in m.chunks(points * len).enumerate() {
                output(&mut work, task);
            }
        }
    }
}

#[derive(Debug)]
/// How a convolution goes through its tiles: in chunks of `chunk` tiles (whole rows of them),
/// one at a time over all threads, or (`private`) each thread its own chunks in its own part of
/// the scratch.
struct Plan {
    points: usize,
    chunk: usize,
    private: bool,
    parts: usize,
}

impl Plan {
    fn new(tile: Tile, cin: usize, cout: usize, [n, h, w]: [usize; 3]) -> Self {
        let (m, points) = (tile.size(), tile.points());
        let (tyn, txn) = (h.div_ceil(m), w.div_ceil(m));
        let rows = |tiles: usize| (tiles / txn).clamp(1, n * tyn) * txn;
        let threads = rayon::current_num_threads();
        // Small weights (U within a thread's L2) over many tiles: each thread transforms,
        // multiplies and transforms back its own chunks, sized for its cache, with no
        // waiting on the others between the steps.
        let private_chunk = rows(PRIVATE_FLOATS / (points * (cin + cout)));
        if points * cin * cout <= PRIVATE_WEIGHTS && n * tyn * txn >= 2 * threads * private_chunk {
            Self {
                points,
                chunk: private_chunk,
                private: true,
                parts: threads,
            }
        } else {
            Self {
                points,
                chunk: rows(CHUNK_FLOATS / (points * cin.max(cout))),
                private: false,
                parts: 1,
            }
        }
    }

    fn scratch(&self, cin: usize, cout: usize) -> usize {
        (cin + cout) * self.points * self.chunk * self.parts
    }
}

/// Transformed floats (input and output) of one thread's chunk when each thread runs its own.
const PRIVATE_FLOATS: usize = 1 << 19;

/// The most transformed weights (U, `points x cin x cout`) of a convolution run one chunk per
/// thread: 1 MiB.
const PRIVATE_WEIGHTS: usize = 16 * 128 * 128;

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

/// `U = G g G^T` of F(2x2, 3x3) for `weight` `[cout][cin][3][3]`, laid out `[16][cout][cin]`
/// (G's halves are exact in float32).
fn weights_f2(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
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
    u
}

/// `U = G g G^T` of F(4x4, 3x3) for `weight` `[cout][cin][3][3]`, laid out `[36][cout][cin]`.
fn weights_f4(weight: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let (a, points, g) = (6, Tile::F4.points(), &G4);
    let mut u = vec![0.0f32; points * cout * cin];
    // One output channel per task: it writes row o of each of the `[cout][cin]` blocks,
    // all input channels at once (so that every step runs along contiguous rows).
    let up = SendPtr(u.as_mut_ptr());
    (0..cout).into_par_iter().for_each_init(
        || {
            (
                vec![0.0f64; 9 * cin],
                vec![0.0f64; 3 * a * cin],
                vec![0.0f32; cin],
            )
        },
        |(k, gk, row), o| {
            let up = &up;
            // k[j][i] = weight[o][i][j]: tap j of every input channel.
            for (i, taps) in weight[o * cin * 9..][..cin * 9].chunks_exact(9).enumerate() {
                for (j, &v) in taps.iter().enumerate() {
                    k[j * cin + i] = v as f64;
                }
            }
            // gk[r][c][i] = (G k)[r][c], in f64 (G's sixths and twenty-fourths are inexact
            // in f32).
            for r in 0..a {
                for c in 0..3 {
                    let out = &mut gk[(r * 3 + c) * cin..][..cin];
                    let (k0, k1, k2) = (
                        &k[c * cin..][..cin],
                        &k[(3 + c) * cin..][..cin],
                        &k[(6 + c) * cin..][..cin],
                    );
                    let [g0, g1, g2] = g[r];
                    for i in 0..cin {
                        out[i] = g0 * k0[i] + g1 * k1[i] + g2 * k2[i];
                    }
                }
            }
            // U[r][s] = sum_c (G k)[r][c] G[s][c]
            for r in 0..a {
                for (s, gs) in g.iter().enumerate() {
                    let (g0, g1, g2) = (
                        &gk[(r * 3) * cin..][..cin],
                        &gk[(r * 3 + 1) * cin..][..cin],
                        &gk[(r * 3 + 2) * cin..][..cin],
                    );
                    for i in 0..cin {
                        row[i] = (g0[i] * gs[0] + g1[i] * gs[1] + g2[i] * gs[2]) as f32;
                    }
                    // SAFETY: row o of block (r, s) of u, cin floats, written by task o
                    // only, while u lives.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            row.as_ptr(),
                            up.0.add(((r * a + s) * cout + o) * cin),
                            cin,
                        )
                    };
                }
            }
        },
    );
    u
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint regions of one buffer to rayon tasks (see the call sites).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Where the tiles of one layer sit in the batch. Tiles are numbered image by image, row by row;
/// a chunk always holds whole rows of tiles, so that the transforms run along rows (vectorised).
struct Geometry {
    tile: Tile,
    h: usize,
    w: usize,
    tyn: usize,
    txn: usize,
    planes_in: usize,
    planes_out: usize,
}

impl Geometry {
    /// `out[xi * len + t] = (B^T d B)[xi]` for the patch `d` of channel `c` under each tile `t`
    /// of the tile rows `r0..r0 + len / txn` (zero outside the image).
    fn input_tiles(&self, x: &[f32], c: usize, r0: usize, len: usize, out: &mut [f32]) {
        match self.tile {
            Tile::F2 => self.input_tiles_f2(x, c, r0, len, out),
            Tile::F4 => self.input_tiles_f4(x, c, r0, len, out),
        }
    }

    /// Writes `relu(A^T m A + bias)` (without the ReLU when `relu` is false) of every tile in `m`
    /// (`[points][len]`, output channel `o`, tile rows `r0..r0 + len / txn`) into the output
    /// planes of channel `o`; `work` is scratch (whatever it holds).
    ///
    /// # Safety
    ///
    /// `y` points to `[n][planes_out][h][w]` floats; no other thread writes channel `o`.
    unsafe fn output_tiles(
        &self,
        m: &[f32],
        o: usize,
        bias: (f32, bool),
        (r0, len): (usize, usize),
        y: *mut f32,
        work: &mut Vec<f32>,
    ) {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            match self.tile {
                Tile::F2 => self.output_tiles_f2(m, o, bias, r0, len, y),
                Tile::F4 => self.output_tiles_f4(m, o, bias, (r0, len), y, work),
            }
        }
    }

    /// [`Geometry::input_tiles`] of F(4x4, 3x3): 6x6 patches `d`, with
    /// `B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0;
    /// 0 4 0 -5 0 1]`.
    fn input_tiles_f4(&self, x: &[f32], c: usize, r0: usize, len: usize, out: &mut [f32]) {
        let (h, w, txn) = (self.h, self.w, self.txn);
        // First the patches themselves, out[(r 6 + k) len + t] = d[r][k] of tile t, from an
        // input row padded (column p holds input column p - 1).
        let mut padded = vec![0.0f32; 4 * txn + 4];
        for rr in 0..len / txn {
            let (n, ty) = ((r0 + rr) / self.tyn, (r0 + rr) % self.tyn);
            let plane = &x[(n * self.planes_in + c) * h * w..][..h * w];
            let at = rr * txn;
            for r in 0..6 {
                let yy = (4 * ty + r) as isize - 1;
                let run = |k: usize| (r * 6 + k) * len + at;
                if yy < 0 || yy as usize >= h {
                    for k in 0..6 {
                        out[run(k)..][..txn].fill(0.0);
                    }
                    continue;
                }
                padded[1..=w].copy_from_slice(&plane[yy as usize * w..][..w]);
                padded[w + 1..].fill(0.0);
                // Column k of tile t is padded column 4 t + k: six strided runs, written
                // where they go (short copies by `memmove` cost more than the gather).
                let mut runs = out[run(0)..].chunks_mut(len).map(|r| &mut r[..txn]);
                let mut next = || runs.next().expect("six runs");
                let (o0, o1, o2, o3, o4, o5) = (next(), next(), next(), next(), next(), next());
                for t in 0..txn {
                    let q = &padded[4 * t..][..6];
                    (o0[t], o1[t], o2[t], o3[t], o4[t], o5[t]) =
                        (q[0], q[1], q[2], q[3], q[4], q[5]);
                }
            }
        }
        // Then B^T d B in place, each step along all the chunk's tiles at once.
        let b_t = |d: [f32; 6]| {
            [
                4.0 * d[0] - 5.0 * d[2] + d[4],
                (d[3] + d[4]) - 4.0 * (d[1] + d[2]),
                4.0 * (d[1] - d[2]) + (d[4] - d[3]),
                2.0 * (d[3] - d[1]) + (d[4] - d[2]),
                2.0 * (d[1] - d[3]) + (d[4] - d[2]),
                4.0 * d[1] - 5.0 * d[3] + d[5],
            ]
        };
        // Along r: the runs (r 6 + k) for r = 0..6, 6 len apart.
        for k in 0..6 {
            let mut runs = out[k * len..].chunks_mut(6 * len).map(|r| &mut r[..len]);
            let mut next = || runs.next().expect("six runs");
            let v = [next(), next(), next(), next(), next(), next()];
            transform_runs(v, len, b_t);
        }
        // Along k: the six consecutive runs of each r.
        for r in 0..6 {
            let mut runs = out[r * 6 * len..][..6 * len].chunks_exact_mut(len);
            let mut next = || runs.next().expect("six runs");
            let v = [next(), next(), next(), next(), next(), next()];
            transform_runs(v, len, b_t);
        }
    }

    /// [`Geometry::output_tiles`] of F(4x4, 3x3), with
    /// `A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]`.
    ///
    /// # Safety
    ///
    /// As [`Geometry::output_tiles`].
    unsafe fn output_tiles_f4(
        &self,
        m: &[f32],
        o: usize,
        (bias, relu): (f32, bool),
        (r0, len): (usize, usize),
        y: *mut f32,
        work: &mut Vec<f32>,
    ) {
        let (h, w, txn) = (self.h, self.w, self.txn);
        let a_t = |v: [f32; 6]| {
            let (s12, d12, s34, d34) = (v[1] + v[2], v[1] - v[2], v[3] + v[4], v[3] - v[4]);
            [
                v[0] + s12 + s34,
                d12 + 2.0 * d34,
                s12 + 4.0 * s34,
                d12 + 8.0 * d34 + v[5],
            ]
        };
        // a[(r 6 + k) len + t] = (A^T m)[r][k], along all the chunk's tiles at once; then
        // q[(r 4 + j) len + t] = (A^T m A)[r][j] + bias, ReLU'd. Both in `work`, every element
        // written before it is read.
        if work.len() < 40 * len {
            work.resize(40 * len, 0.0);
        }
        let (a, q) = work[..40 * len].split_at_mut(24 * len);
        for k in 0..6 {
            let v: [&[f32]; 6] = std::array::from_fn(|i| &m[(i * 6 + k) * len..][..len]);
            let mut runs = a[k * len..].chunks_mut(6 * len).map(|r| &mut r[..len]);
            let mut next = || runs.next().expect("four runs");
            let [a0, a1, a2, a3] = [next(), next(), next(), next()];
            for t in 0..len {
                let out = a_t([v[0][t], v[1][t], v[2][t], v[3][t], v[4][t], v[5][t]]);
                (a0[t], a1[t], a2[t], a3[t]) = (out[0], out[1], out[2], out[3]);
            }
        }
        for r in 0..4 {
            let v: [&[f32]; 6] = std::array::from_fn(|k| &a[(r * 6 + k) * len..][..len]);
            let mut runs = q[r * 4 * len..][..4 * len].chunks_exact_mut(len);
            let mut next = || runs.next().expect("four runs");
            let [q0, q1, q2, q3] = [next(), next(), next(), next()];
            for t in 0..len {
                let mut out = a_t([v[0][t], v[1][t], v[2][t], v[3][t], v[4][t], v[5][t]]);
                for e in &mut out {
                    *e += bias;
                    if relu {
                        *e = e.max(0.0);
                    }
                }
                (q0[t], q1[t], q2[t], q3[t]) = (out[0], out[1], out[2], out[3]);
            }
        }
        // Row r of each tile row: the four columns of its tiles, interleaved, written where
        // they go.
        for rr in 0..len / txn {
            let (n, ty) = ((r0 + rr) / self.tyn, (r0 + rr) % self.tyn);
            let at = rr * txn;
            for r in 0..4 {
                let yy = 4 * ty + r;
                if yy >= h {
                    break;
                }
                let col = |j: usize| &q[(r * 4 + j) * len + at..][..txn];
                let (c0, c1, c2, c3) = (col(0), col(1), col(2), col(3));
                // SAFETY: row yy of channel o's plane of image n, w floats that no other thread
                // writes (caller's contract).
                let row = unsafe {
                    std::slice::from_raw_parts_mut(
                        y.add((n * self.planes_out + o) * h * w + yy * w),
                        w,
                    )
                };
                let whole = w / 4;
                for (t, e) in row[..4 * whole].chunks_exact_mut(4).enumerate() {
                    (e[0], e[1], e[2], e[3]) = (c0[t], c1[t], c2[t], c3[t]);
                }
                for (j, e) in row[4 * whole..].iter_mut().enumerate() {
                    *e = [c0, c1, c2, c3][j][whole];
                }
            }
        }
    }

    /// [`Geometry::input_tiles`] of F(2x2, 3x3): 4x4 patches.
    fn input_tiles_f2(&self, x: &[f32], c: usize, r0: usize, len: usize, out: &mut [f32]) {
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

    /// [`Geometry::output_tiles`] of F(2x2, 3x3).
    ///
    /// # Safety
    ///
    /// As [`Geometry::output_tiles`].
    unsafe fn output_tiles_f2(
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

/// `v[..][t] = f(v[0][t], ..., v[5][t])` for every `t < len`, in place: one step of a
/// separable 6-point transform along contiguous runs.
#[inline(always)]
fn transform_runs(v: [&mut [f32]; 6], len: usize, f: impl Fn([f32; 6]) -> [f32; 6]) {
    let [v0, v1, v2, v3, v4, v5] = v;
    let (v0, v1, v2, v3, v4, v5) = (
        &mut v0[..len],
        &mut v1[..len],
        &mut v2[..len],
        &mut v3[..len],
        &mut v4[..len],
        &mut v5[..len],
    );
    for t in 0..len {
        let out = f([v0[t], v1[t], v2[t], v3[t], v4[t], v5[t]]);
        (v0[t], v1[t], v2[t], v3[t], v4[t], v5[t]) =
            (out[0], out[1], out[2], out[3], out[4], out[5]);
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
        for tile in [Tile::F2, Tile::F4] {
            for &(n, cin, cout, h, w) in &[(2, 3, 5, 7, 6), (1, 2, 3, 3, 5), (3, 4, 6, 9, 8)] {
                let x = values(n * cin * h * w, 4);
                let (wt, b) = (values(cout * cin * 9, 5), values(cout, 6));
                let conv = Conv3x3::with_tile(&wt, &b, cout, cin, tile);
                let y = &mut y[..n * cout * h * w];
                assert!(conv.scratch_len([n, h, w]) <= scratch.len());
                conv.forward_into(&x, [n, h, w], y, &mut scratch);
                assert_eq!(
                    y,
                    conv.forward(&x, n, h, w),
                    "{tile:?} {n}x{cin}->{cout} {h}x{w}"
                );
            }
        }
    }

    #[test]
    fn winograd_matches_the_direct_convolution_on_odd_and_even_sizes() {
        // Every remainder of the map size by both tile sizes, tiles cut by the image's edge.
        let sizes = [
            (2, 3, 5, 7, 6),
            (1, 4, 3, 1, 1),
            (3, 2, 2, 5, 9),
            (1, 8, 4, 2, 3),
            (2, 16, 3, 11, 12),
            (1, 64, 2, 13, 10),
            (2, 512, 8, 4, 4),
        ];
        // F(4x4)'s transforms scale by up to 8 and 1/24: about ten times F(2x2)'s rounding
        // (worst 8e-6 here with gemm's FMA kernels; summed without FMA, up to about 1.2e-5).
        for (tile, tolerance) in [(Tile::F2, 2e-6), (Tile::F4, 2e-5)] {
            let mut worst = 0.0f32;
            for &(n, cin, cout, h, w) in &sizes {
                let x = values(n * cin * h * w, 1);
                let wt = values(cout * cin * 9, 2);
                let b = values(cout, 3);
                let want = direct(&x, &wt, &b, n, cin, cout, h, w);
                let conv = Conv3x3::with_tile(&wt, &b, cout, cin, tile);
                let got = conv.forward(&x, n, h, w);
                // The sums reach about 3 sqrt(cin): an error relative to 1 + |e| as large as
                // float32's own rounding of them.
                let scale = (cin as f32).sqrt();
                for (k, (g, e)) in got.iter().zip(&want).enumerate() {
                    let err = (g - e).abs() / (scale + e.abs());
                    worst = worst.max(err);
                    assert!(
                        err <= tolerance,
                        "{tile:?} {n}x{cin}->{cout} {h}x{w} at {k}: {g} vs {e}"
                    );
                }
                // Every way through the tiles gives the same values.
                for plan in every_plan(&conv, [n, h, w]) {
                    assert_eq!(planned(&conv, &x, [n, h, w], &plan), got, "{plan:?}");
                }
            }
            eprintln!("{tile:?}: worst error {worst:e}");
            assert!(worst > 0.0, "{tile:?}: rounding shows somewhere");
        }
    }

    /// Ways through the tiles of `[n, h, w]`: the one chosen, and chunks of one and two rows of
    /// tiles, one at a time over all threads, or each of 1 to 3 parts of the scratch its own.
    fn every_plan(conv: &Conv3x3, [n, h, w]: [usize; 3]) -> Vec<Plan> {
        let (m, points) = (conv.tile.size(), conv.tile.points());
        let txn = w.div_ceil(m);
        let rows = n * h.div_ceil(m);
        let mut all = vec![conv.plan([n, h, w])];
        for chunk in [txn, (2 * txn).min(rows * txn)] {
            all.push(Plan {
                points,
                chunk,
                private: false,
                parts: 1,
            });
            for parts in 1..=3 {
                all.push(Plan {
                    points,
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
        for tile in [Tile::F2, Tile::F4] {
            let (wt, b) = (values(cout * cin * 9, 1), values(cout, 2));
            let conv = Conv3x3::with_tile(&wt, &b, cout, cin, tile);
            let x = values(n * cin * h * w, 3);
            let m = tile.size();
            let want = planned(
                &conv,
                &x,
                [n, h, w],
                &Plan {
                    points: tile.points(),
                    chunk: n * h.div_ceil(m) * w.div_ceil(m),
                    private: false,
                    parts: 1,
                },
            );
            assert!(want.iter().any(|v| *v > 0.0) && want.iter().all(|v| v.is_finite()));
            for plan in every_plan(&conv, [n, h, w]) {
                assert_eq!(planned(&conv, &x, [n, h, w], &plan), want, "{plan:?}");
            }
        }
        // VGG's first block (F(2x2)) is run that way (on up to 250 threads), its later ones
        // (F(4x4)) not.
        assert_eq!(Tile::for_layer(64, 64, [150, 150]), Tile::F2);
        assert!(Plan::new(Tile::F2, 64, 64, [20, 150, 150]).private);
        assert_eq!(Tile::for_layer(256, 256, [37, 37]), Tile::F4);
        assert!(!Plan::new(Tile::F4, 256, 256, [20, 37, 37]).private);
    }

    #[test]
    fn chunks_smaller_than_the_batch_give_the_same_result() {
        // 3 images of 130x130 are 195 rows of 65 2x2 tiles or 99 rows of 33 4x4 tiles; a chunk
        // is a few rows (2^19 / (points x 66) tiles, each thread its own) or, on many threads,
        // a few dozen (2^22 / (points x 64) tiles): fewer than the batch's either way.
        let (n, cin, cout, h, w) = (3, 2, 64, 130, 130);
        let x = values(n * cin * h * w, 4);
        let wt = values(cout * cin * 9, 5);
        let b = values(cout, 6);
        for tile in [Tile::F2, Tile::F4] {
            let conv = Conv3x3::with_tile(&wt, &b, cout, cin, tile);
            assert!(
                conv.plan([n, h, w]).chunk < n * h.div_ceil(tile.size()) * w.div_ceil(tile.size())
            );
            let whole = conv.forward(&x, n, h, w);
            let per_image: Vec<f32> = (0..n)
                .flat_map(|i| conv.forward(&x[i * cin * h * w..][..cin * h * w], 1, h, w))
                .collect();
            assert_eq!(whole, per_image);
            assert!(whole.iter().any(|v| *v > 0.0));
        }
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
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p * q) as f64).sum::<f64>();
        for tile in [Tile::F2, Tile::F4] {
            let y = Conv3x3::with_tile(&wt, &vec![0.0; cout], cout, cin, tile)
                .without_relu()
                .forward(&x, n, h, w);
            let dx = Conv3x3::backward_input(&wt, cout, cin, tile).forward(&g, n, h, w);
            let (l, r) = (dot(&y, &g), dot(&x, &dx));
            assert!(
                (l - r).abs() < 1e-4 * l.abs().max(1.0),
                "{tile:?}: {l} vs {r}"
            );
        }
    }
}
