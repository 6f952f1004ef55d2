//! 2x2 max pooling (stride 2) and its gradient on the CPU, planar `[n][c][h][w]`: VGG's pools in
//! the frozen forward and in the hand-written training step.

use rayon::prelude::*;

/// 2x2 max pooling, stride 2, no padding (odd sizes drop the last row/column), `[n][c][h][w]`.
pub fn max_pool(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; planes * (h / 2) * (w / 2)];
    max_pool_into(x, planes, h, w, &mut y);
    y
}

/// [`max_pool`] into `y` (`[planes][h / 2][w / 2]`), every element overwritten.
pub fn max_pool_into(x: &[f32], planes: usize, h: usize, w: usize, y: &mut [f32]) {
    let (ho, wo) = (h / 2, w / 2);
    assert_eq!(y.len(), planes * ho * wo, "pooling output");
    if ho == 0 || wo == 0 {
        return;
    }
    y.par_chunks_mut(ho * wo)
        .zip(x.par_chunks(h * w))
        .for_each(|(out, plane)| {
            for i in 0..ho {
                let (r0, r1) = (&plane[2 * i * w..][..w], &plane[(2 * i + 1) * w..][..w]);
                for j in 0..wo {
                    out[i * wo + j] = r0[2 * j]
                        .max(r0[2 * j + 1])
                        .max(r1[2 * j])
                        .max(r1[2 * j + 1]);
                }
            }
        });
}

/// The gradient of [`max_pool`]: each window's gradient goes to its largest input (the first
/// in row order on a tie); inputs outside every window (an odd edge) get none.
pub fn max_pool_backward(x: &[f32], g: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut dx = vec![0.0f32; planes * h * w];
    if ho == 0 || wo == 0 {
        return dx;
    }
    dx.par_chunks_mut(h * w)
        .zip(x.par_chunks(h * w))
        .zip(g.par_chunks(ho * wo))
        .for_each(|((d, plane), gp)| {
            for i in 0..ho {
                for j in 0..wo {
                    let at = [
                        2 * i * w + 2 * j,
                        2 * i * w + 2 * j + 1,
                        (2 * i + 1) * w + 2 * j,
                        (2 * i + 1) * w + 2 * j + 1,
                    ];
                    let best = at
                        .into_iter()
                        .reduce(|b, k| if plane[k] > plane[b] { k } else { b })
                        .unwrap_or(at[0]);
                    d[best] += gp[i * wo + j];
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pool_gradient_goes_to_each_windows_maximum() {
        let x: Vec<f32> = vec![
            1.0, 5.0, 2.0, 0.0, 9.0, //
            3.0, 4.0, 8.0, 1.0, 9.0, //
            7.0, 7.0, 0.0, 6.0, 9.0,
        ];
        let dx = max_pool_backward(&x, &[10.0, 20.0], 1, 3, 5);
        let mut want = vec![0.0; 15];
        want[1] = 10.0; // 5 is the largest of 1 5 3 4
        want[7] = 20.0; // 8 of 2 0 8 1; the last column and row are in no window
        assert_eq!(dx, want);
    }

    #[test]
    fn max_pool_into_a_used_buffer_overwrites_all_of_it() {
        let x: Vec<f32> = (0..2 * 5 * 5).map(|v| v as f32).collect();
        let mut y = vec![f32::NAN; 8];
        max_pool_into(&x, 2, 5, 5, &mut y);
        assert_eq!(y, max_pool(&x, 2, 5, 5));
        y.fill(f32::NAN);
        max_pool_into(&x, 1, 4, 4, &mut y[..4]);
        assert_eq!(y[..4], [5.0, 7.0, 13.0, 15.0]);
    }

    #[test]
    fn max_pool_drops_the_odd_edge() {
        let x: Vec<f32> = (0..2 * 5 * 5).map(|v| v as f32).collect();
        let y = max_pool(&x, 2, 5, 5);
        assert_eq!(y, vec![6.0, 8.0, 16.0, 18.0, 31.0, 33.0, 41.0, 43.0]);
    }
}
