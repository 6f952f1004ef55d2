//! Row-major matrix products on the CPU through the `gemm` crate (the one burn's CPU backend
//! uses), over slices: the hand-written training step's dense layers.

/// `dst (m x n, row-major) (+)= lhs (m x k) rhs (k x n)`, operands given as
/// `(values, row stride, column stride)`.
pub fn matmul(
    dst: &mut [f32],
    [m, n, k]: [usize; 3],
    (lhs, lrs, lcs): (&[f32], usize, usize),
    (rhs, rrs, rcs): (&[f32], usize, usize),
    accumulate: bool,
) {
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| {
        if rows == 0 || cols == 0 {
            0
        } else {
            (rows - 1) * rs + (cols - 1) * cs + 1
        }
    };
    assert!(dst.len() >= m * n);
    assert!(lhs.len() >= last(lrs, lcs, m, k) && rhs.len() >= last(rrs, rcs, k, n));
    // SAFETY: every index gemm touches is inside the slices (asserted above); `dst` is a unique
    // borrow, so it overlaps neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lcs as isize,
            lrs as isize,
            rhs.as_ptr(),
            rcs as isize,
            rrs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism(m * n * k),
        );
    }
}

/// `x^T g` (a dense layer's weight gradient), into a buffer that is written once (not
/// zero-filled first).
///
/// # Shapes
///
/// - x: `[batch, inputs]`, g: `[batch, units]`
/// - output: `[inputs, units]`
pub fn xt_g(x: &[f32], g: &[f32], batch: usize, inputs: usize, units: usize) -> Vec<f32> {
    let len = inputs * units;
    let mut dw = Vec::<f32>::with_capacity(len);
    assert!(x.len() >= batch * inputs && g.len() >= batch * units);
    // SAFETY: gemm writes all `inputs x units` entries of the destination (it does not read it:
    // `read_dst` is false) before `set_len`; the operands' strides stay inside `x` and `g`
    // (asserted above); the three buffers do not overlap.
    unsafe {
        gemm::gemm(
            inputs,
            units,
            batch,
            dw.as_mut_ptr(),
            1,
            units as isize,
            false,
            x.as_ptr(),
            inputs as isize,
            1,
            g.as_ptr(),
            1,
            units as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism(inputs * units * batch),
        );
        dw.set_len(len);
    }
    dw
}

/// All threads for products worth splitting, one for small ones.
pub fn parallelism(flops: usize) -> gemm::Parallelism {
    if flops >= 1 << 20 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    }
}
