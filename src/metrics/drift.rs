//! Drift statistics between a reference and a window distribution, computed
//! from bin / cell counts: PSI, Jensen-Shannon, KL, Hellinger (binned,
//! smoothed), Kolmogorov-Smirnov and Wasserstein-1 (fine quantile grid),
//! chi-square (categorical contingency), and Benjamini-Hochberg adjustment for
//! the drift decision. Pure functions; conventions in the [module docs](super).

use statrs::distribution::{ChiSquared, ContinuousCDF};

/// Smoothed proportions: `(c_i / n + s) / (1 + k * s)` for every bin; `out` is overwritten.
/// Returns `false` (and leaves `out` empty) when the counts are all zero.
pub fn smoothed(counts: &[u64], smoothing: f64, out: &mut Vec<f64>) -> bool {
    out.clear();
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return false;
    }
    let norm = 1.0 + counts.len() as f64 * smoothing;
    out.extend(
        counts
            .iter()
            .map(|&c| (c as f64 / n as f64 + smoothing) / norm),
    );
    true
}

/// The binned statistics of a window (`actual`) against the reference (`expected`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BinnedStats {
    /// Population stability index, `sum((a - e) * ln(a / e))`.
    pub psi: f64,
    /// Jensen-Shannon distance, base 2.
    pub js_distance: f64,
    /// KL divergence of the window from the reference, `sum(a * ln(a / e))` (nats).
    pub kl_divergence: f64,
    /// Hellinger distance, `sqrt(1 - sum(sqrt(a * e)))`.
    pub hellinger: f64,
}

/// Binned statistics of two proportion vectors of equal length with no zero entry
/// (as [`smoothed`] produces).
pub fn binned_stats(expected: &[f64], actual: &[f64]) -> BinnedStats {
    let (se, sa): (f64, f64) = (expected.iter().sum(), actual.iter().sum());
    let mut psi = 0.0;
    let mut kl = 0.0;
    let mut bc = 0.0;
    let (mut js_l, mut js_r) = (0.0, 0.0);
    for (&e, &a) in expected.iter().zip(actual) {
        let r = (a / e).ln();
        psi += (a - e) * r;
        kl += a * r;
        bc += (a * e).sqrt();
        // scipy.spatial.distance.jensenshannon normalises its inputs first.
        let (p, q) = (e / se, a / sa);
        let m = (p + q) / 2.0;
        js_l += rel_entr(p, m);
        js_r += rel_entr(q, m);
    }
    let js = ((js_l + js_r) / std::f64::consts::LN_2 / 2.0)
        .max(0.0)
        .sqrt();
    BinnedStats {
        psi,
        js_distance: js,
        kl_divergence: kl,
        hellinger: (1.0 - bc).max(0.0).sqrt(),
    }
}

/// scipy's `rel_entr(x, y) = x * ln(x / y)` (0 when x = 0).
fn rel_entr(x: f64, y: f64) -> f64 {
    if x > 0.0 && y > 0.0 {
        x * (x / y).ln()
    } else if x == 0.0 && y >= 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// Two-sample Kolmogorov-Smirnov statistic from reference and window counts on
/// the same cells (see [`super::reference::NumericProfile`]): the largest CDF
/// gap at every cell boundary. `None` when either side is empty.
pub fn ks_statistic(reference: &[u64], current: &[u64]) -> Option<f64> {
    let (n, m) = (reference.iter().sum::<u64>(), current.iter().sum::<u64>());
    if n == 0 || m == 0 {
        return None;
    }
    let (mut cr, mut cc) = (0u64, 0u64);
    let mut d: f64 = 0.0;
    for (&r, &c) in reference.iter().zip(current) {
        cr += r;
        cc += c;
        d = d.max((cr as f64 / n as f64 - cc as f64 / m as f64).abs());
    }
    Some(d)
}

/// Asymptotic p-value of a two-sample KS statistic `d` for sample sizes `n`
/// and `m` (Kolmogorov distribution, Stephens' correction).
pub fn ks_p_value(d: f64, n: u64, m: u64) -> f64 {
    if n == 0 || m == 0 {
        return 1.0;
    }
    let en = (n as f64 * m as f64 / (n as f64 + m as f64)).sqrt();
    let lambda = (en + 0.12 + 0.11 / en) * d;
    kolmogorov_sf(lambda)
}

/// `P(K > lambda)` for the Kolmogorov distribution.
fn kolmogorov_sf(lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 1.0;
    }
    if lambda < 1.18 {
        // The theta-function form converges fast for small lambda.
        let y = -std::f64::consts::PI * std::f64::consts::PI / (8.0 * lambda * lambda);
        let mut s = 0.0;
        for k in 0..20 {
            let j = (2 * k + 1) as f64;
            s += (y * j * j).exp();
        }
        (1.0 - (2.0 * std::f64::consts::PI).sqrt() / lambda * s).clamp(0.0, 1.0)
    } else {
        let mut s = 0.0;
        let mut sign = 1.0;
        for k in 1..=100 {
            let kf = k as f64;
            let t = (-2.0 * kf * kf * lambda * lambda).exp();
            s += sign * t;
            if t < 1e-18 {
                break;
            }
            sign = -sign;
        }
        (2.0 * s).clamp(0.0, 1.0)
    }
}

/// Counts and value sums of one side (reference or window) on the reference
/// grid's cells, for [`wasserstein`].
#[derive(Debug, Clone, Copy)]
pub struct GridSide<'a> {
    /// Counts per cell (`2 * grid.len() + 1`).
    pub cells: &'a [u64],
    /// Sum of the values inside each open interior cell `(grid[i], grid[i + 1])`.
    pub interior_sums: &'a [f64],
    /// `sum(min - v)` over values below the grid minimum.
    pub below_gap: f64,
    /// `sum(v - max)` over values above the grid maximum.
    pub above_gap: f64,
}

/// 1-Wasserstein distance `integral |F_ref - F_cur| dx` from cell counts and
/// per-cell value sums on the reference grid. The integral of each CDF over
/// every cell is exact (from the counts and sums), so the result is exact
/// except inside the few cells where the two CDFs cross, where the gap is
/// modelled as one step with the exact signed integral. `None` when either side is
/// empty or the shapes disagree.
pub fn wasserstein(grid: &[f64], r: GridSide<'_>, c: GridSide<'_>) -> Option<f64> {
    let (n, m) = (
        r.cells.iter().sum::<u64>() as f64,
        c.cells.iter().sum::<u64>() as f64,
    );
    let cells = 2 * grid.len() + 1;
    let interior = grid.len().saturating_sub(1);
    if n == 0.0
        || m == 0.0
        || r.cells.len() != cells
        || c.cells.len() != cells
        || r.interior_sums.len() != interior
        || c.interior_sums.len() != interior
    {
        return None;
    }
    let mut w = (r.below_gap + r.above_gap) / n + (c.below_gap + c.above_gap) / m;
    // Outside the grid one CDF is 0 (below) or 1 (above) for the reference
    // only when it has no mass there, which holds for a profile's own cells.
    let (mut fr, mut fc) = (r.cells[0] as f64 / n, c.cells[0] as f64 / m);
    for i in 0..interior {
        // after the point mass at grid[i]
        fr += r.cells[2 * i + 1] as f64 / n;
        fc += c.cells[2 * i + 1] as f64 / m;
        let (a, b) = (grid[i], grid[i + 1]);
        let width = b - a;
        let d0 = fr - fc;
        // integral over (a, b) of F = width * F(a) + sum(b - x_i) / n
        let (kr, kc) = (r.cells[2 * i + 2] as f64, c.cells[2 * i + 2] as f64);
        let tail_r = (kr * b - r.interior_sums[i]) / n;
        let tail_c = (kc * b - c.interior_sums[i]) / m;
        fr += kr / n;
        fc += kc / m;
        let d1 = fr - fc;
        let signed = width * d0 + tail_r - tail_c;
        if d0 * d1 >= 0.0 {
            w += signed.abs();
        } else if width > 0.0 {
            // The CDFs cross inside the cell: model the gap as a step from d0
            // to d1 placed so that the signed integral is exact.
            let t = ((signed / width - d1) / (d0 - d1)).clamp(0.0, 1.0);
            w += width * (d0.abs() * t + d1.abs() * (1.0 - t));
        }
    }
    Some(w)
}

/// Pearson chi-square of the 2 x k table (reference counts, window counts)
/// over the bins non-empty in either row: `(statistic, p_value, dof)`.
/// `None` when either row is empty; `(0, 1, 0)` with a single non-empty bin.
pub fn chi2_contingency(reference: &[u64], current: &[u64]) -> Option<(f64, f64, usize)> {
    let r: u64 = reference.iter().sum();
    let c: u64 = current.iter().sum();
    if r == 0 || c == 0 {
        return None;
    }
    let total = (r + c) as f64;
    let mut stat = 0.0;
    let mut cols = 0usize;
    for (&a, &b) in reference.iter().zip(current) {
        let col = (a + b) as f64;
        if col == 0.0 {
            continue;
        }
        cols += 1;
        let ea = r as f64 * col / total;
        let eb = c as f64 * col / total;
        stat += (a as f64 - ea).powi(2) / ea + (b as f64 - eb).powi(2) / eb;
    }
    if cols < 2 {
        return Some((0.0, 1.0, 0));
    }
    let dof = cols - 1;
    let p = ChiSquared::new(dof as f64)
        .map(|d| d.sf(stat))
        .unwrap_or(f64::NAN);
    Some((stat, p, dof))
}

/// Benjamini-Hochberg adjusted p-values, in the input order.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut adjusted = vec![1.0; m];
    let mut running: f64 = 1.0;
    for rank in (0..m).rev() {
        let i = order[rank];
        running = running.min(p[i] * m as f64 / (rank + 1) as f64);
        adjusted[i] = running.min(1.0);
    }
    adjusted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_adds_to_every_bin_and_renormalises() {
        let mut out = Vec::new();
        assert!(smoothed(&[3, 1, 0, 0], 0.1, &mut out));
        // (0.75 + .1) / 1.4, (0.25 + .1) / 1.4, .1 / 1.4, .1 / 1.4
        let want = [0.85 / 1.4, 0.35 / 1.4, 0.1 / 1.4, 0.1 / 1.4];
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-15);
        }
        assert!((out.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert!(!smoothed(&[0, 0], 0.1, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn binned_stats_hand_checked() {
        let e = [0.5, 0.5];
        let a = [0.25, 0.75];
        let s = binned_stats(&e, &a);
        let psi = -0.25 * (0.5f64).ln() + 0.25 * (1.5f64).ln();
        assert!((s.psi - psi).abs() < 1e-15);
        let kl = 0.25 * (0.5f64).ln() + 0.75 * (1.5f64).ln();
        assert!((s.kl_divergence - kl).abs() < 1e-15);
        let h = (1.0 - (0.125f64).sqrt() - (0.375f64).sqrt()).sqrt();
        assert!((s.hellinger - h).abs() < 1e-15);
        // scipy.spatial.distance.jensenshannon([.5,.5],[.25,.75], base=2)
        assert!(
            (s.js_distance - 0.220_895_768_849_017_35).abs() < 1e-12,
            "{}",
            s.js_distance
        );
        let same = binned_stats(&e, &e);
        assert_eq!(
            (same.psi, same.kl_divergence, same.js_distance),
            (0.0, 0.0, 0.0)
        );
        assert!(same.hellinger.abs() < 1e-7);
    }

    #[test]
    fn ks_and_wasserstein_on_point_masses_are_exact() {
        // grid [0, 1]; reference: 2 at 0, 2 at 1; window: 1 at 0, 3 at 1.
        let grid = [0.0, 1.0];
        let r = [0, 2, 0, 2, 0];
        let c = [0, 1, 0, 3, 0];
        let (zero, sum) = ([0.0], [1.8]);
        let side = |cells, interior_sums, above_gap| GridSide {
            cells,
            interior_sums,
            below_gap: 0.0,
            above_gap,
        };
        let side_r = side(&r[..], &zero[..], 0.0);
        assert_eq!(ks_statistic(&r, &c), Some(0.25));
        // scipy.stats.wasserstein_distance([0,0,1,1],[0,1,1,1]) = 0.25
        assert_eq!(
            wasserstein(&grid, side_r, side(&c[..], &zero[..], 0.0)),
            Some(0.25)
        );
        // a window value at 3 (above max by 2) instead of one at 1: + 2 / 4
        let c2 = [0, 1, 0, 2, 1];
        assert_eq!(
            wasserstein(&grid, side_r, side(&c2[..], &zero[..], 2.0)),
            Some(0.75)
        );
        // window [0, .9, .9, 1]: wasserstein_distance([0,0,1,1],[0,.9,.9,1]) = 0.25
        let c3 = [0, 1, 2, 1, 0];
        let w = wasserstein(&grid, side_r, side(&c3[..], &sum[..], 0.0)).unwrap();
        assert!((w - 0.25).abs() < 1e-12, "{w}");
        assert_eq!(ks_statistic(&r, &[0; 5]), None);
    }

    #[test]
    fn ks_p_value_matches_the_kolmogorov_distribution() {
        // scipy.special.kolmogorov(1.0) = 0.26999967167735456
        assert!((kolmogorov_sf(1.0) - 0.269_999_671_677_354_56).abs() < 1e-10);
        // kolmogorov(1.5) = 0.022217962616525127 (series branch)
        assert!((kolmogorov_sf(1.5) - 0.022_217_962_616_525_127).abs() < 1e-10);
        assert_eq!(kolmogorov_sf(0.0), 1.0);
        assert!(ks_p_value(0.5, 1000, 1000) < 1e-10);
        assert!(ks_p_value(0.01, 100, 100) > 0.99);
    }

    #[test]
    fn chi2_hand_checked() {
        // table [[10, 20], [20, 10]]: expected 15 everywhere; chi2 = 4 * 25 / 15
        let (s, p, dof) = chi2_contingency(&[10, 20], &[20, 10]).unwrap();
        assert!((s - 100.0 / 15.0).abs() < 1e-12);
        assert_eq!(dof, 1);
        // scipy.stats.chi2.sf(20/3, 1) = 0.009823274507519247
        assert!((p - 0.009_823_274_507_519_235).abs() < 1e-12);
        assert_eq!(chi2_contingency(&[5, 0], &[3, 0]), Some((0.0, 1.0, 0)));
        assert_eq!(chi2_contingency(&[5, 0], &[0, 0]), None);
    }

    #[test]
    fn benjamini_hochberg_hand_checked() {
        // p = [0.01, 0.04, 0.03, 0.5]: sorted .01,.03,.04,.5 -> *4/rank = .04,.06,.0533,.5
        // monotone from the top: .04, .0533, .0533, .5
        let adj = benjamini_hochberg(&[0.01, 0.04, 0.03, 0.5]);
        let want = [0.04, 0.16 / 3.0, 0.16 / 3.0, 0.5];
        for (a, b) in adj.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{adj:?}");
        }
        assert!(benjamini_hochberg(&[]).is_empty());
    }
}
