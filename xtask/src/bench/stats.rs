//! ABBA batches and their statistics.

use anyhow::Result;

use super::sandbox::Worker;

/// One repetition: the means of the two A batches and of the two B batches (ns/op).
#[derive(Debug, Clone, Copy)]
pub struct Pair {
    pub a: f64,
    pub b: f64,
}

/// Runs `command` as A B B A, `reps` times; `key` is the answer's field (ns per op).
pub fn abba(a: &mut Worker, b: &mut Worker, command: &str, reps: usize) -> Result<Vec<Pair>> {
    // Warm-up, thrown away: caches, the listener's accept thread, lazily built kernel state.
    // A failed warm-up (a listener still starting) is retried by the first real batch.
    let _ = a.ask(command);
    let _ = b.ask(command);
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        let a1 = a.ask(command)?.f("ns");
        let b1 = b.ask(command)?.f("ns");
        let b2 = b.ask(command)?.f("ns");
        let a2 = a.ask(command)?.f("ns");
        out.push(Pair {
            a: (a1 + a2) / 2.0,
            b: (b1 + b2) / 2.0,
        });
    }
    Ok(out)
}

/// Runs `cmd_a` and `cmd_b` on one worker as A B B A, `reps` times; one list of pairs per
/// answer field in `keys`.
pub fn abba_commands(
    w: &mut Worker,
    cmd_a: &str,
    cmd_b: &str,
    keys: &[&str],
    reps: usize,
) -> Result<Vec<Vec<Pair>>> {
    let _ = w.ask(cmd_a);
    let _ = w.ask(cmd_b);
    let mut out = vec![Vec::with_capacity(reps); keys.len()];
    for _ in 0..reps {
        let a1 = w.ask(cmd_a)?;
        let b1 = w.ask(cmd_b)?;
        let b2 = w.ask(cmd_b)?;
        let a2 = w.ask(cmd_a)?;
        for (k, pairs) in keys.iter().zip(out.iter_mut()) {
            pairs.push(Pair {
                a: (a1.f(k) + a2.f(k)) / 2.0,
                b: (b1.f(k) + b2.f(k)) / 2.0,
            });
        }
    }
    Ok(out)
}

/// Median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// The `q` quantile of `v` (linear between neighbours; 0 when empty).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = (s.len() - 1) as f64 * q;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// Summary of an ABBA run: median A, median B, median per-pair difference, and the
/// interquartile range of the differences.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub a: f64,
    pub b: f64,
    pub diff: f64,
    pub iqr: f64,
}

impl Summary {
    pub fn of(pairs: &[Pair]) -> Self {
        let d: Vec<f64> = pairs.iter().map(|p| p.a - p.b).collect();
        Self {
            a: median(&pairs.iter().map(|p| p.a).collect::<Vec<_>>()),
            b: median(&pairs.iter().map(|p| p.b).collect::<Vec<_>>()),
            diff: median(&d),
            iqr: quantile(&d, 0.75) - quantile(&d, 0.25),
        }
    }
}

/// Nanoseconds as microseconds with two decimals.
pub fn us(ns: f64) -> String {
    format!("{:.2}", ns / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25), 2.0);
        let s = Summary::of(&[
            Pair { a: 10.0, b: 9.0 },
            Pair { a: 12.0, b: 9.0 },
            Pair { a: 11.0, b: 10.0 },
        ]);
        assert_eq!(s.diff, 1.0);
    }
}
