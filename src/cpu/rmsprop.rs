//! The fused RMSprop update on the CPU: one pass over a parameter, its square average and its
//! gradient, in parallel chunks (`train::optim::FusedRmsProp` decides when it applies).

use rayon::prelude::*;

/// `p`, `s` updated in place from `g` with `[alpha, epsilon, lr, weight_decay]`, as burn's
/// RMSprop computes them (see [`update_chunk`]).
pub fn update(p: &mut [f32], s: &mut [f32], g: &[f32], hyper: [f32; 4]) {
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(s.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((p, s), g)| update_chunk(p, s, g, hyper));
}

/// With `g' = g + wd p`: `s = alpha s + (1 - alpha) g'^2`, `p -= (g' / (sqrt(s) + eps)) lr`
/// (`p * 0 + g` is `g`: one loop for both cases, which the compiler vectorises).
fn update_chunk(p: &mut [f32], s: &mut [f32], g: &[f32], [alpha, eps, lr, wd]: [f32; 4]) {
    let n = p.len();
    let (s, g) = (&mut s[..n], &g[..n]);
    for i in 0..n {
        let gi = p[i] * wd + g[i];
        s[i] = s[i] * alpha + gi * gi * (1.0 - alpha);
        p[i] -= (gi / (s[i].sqrt() + eps)) * lr;
    }
}
