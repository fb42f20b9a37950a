//! A fixed-size log-linear latency histogram (like fio's): constant memory whatever the
//! number of samples, so it does not inflate the RSS it sits beside, with ~1.6% resolution.

/// Sub-buckets per power of two: 2^6 = 64, so a bucket is at most 1/64 of its value wide.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Values below SUB are exact; then one group of SUB buckets per power of two up to 2^63.
const BUCKETS: usize = SUB * (64 - SUB_BITS as usize + 1);

pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Histogram {
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }

    fn index(value: u64) -> usize {
        if value < SUB as u64 {
            return value as usize;
        }
        let magnitude = 63 - value.leading_zeros(); // >= SUB_BITS
        let shift = magnitude - SUB_BITS;
        // (value >> shift) is in [SUB, 2*SUB): the top SUB_BITS+1 bits of the value.
        (shift as usize + 1) * SUB + ((value >> shift) as usize - SUB)
    }

    /// The middle of bucket `index`'s range of values.
    fn value_of(index: usize) -> u64 {
        if index < SUB {
            return index as u64;
        }
        let shift = (index / SUB - 1) as u32;
        let low = ((index % SUB + SUB) as u64) << shift;
        low + ((1u64 << shift) >> 1)
    }

    pub fn record(&mut self, value: u64) {
        self.counts[Self::index(value)] += 1;
        self.total += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    /// The value at percentile `p` (0-100]; 0 when nothing was recorded.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0 * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, &count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Self::value_of(index);
            }
        }
        Self::value_of(BUCKETS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_and_stay_close_to_it() {
        for value in (0..200_000u64).chain([u64::MAX / 3, u64::MAX]) {
            let index = Histogram::index(value);
            assert!(index < BUCKETS);
            let mid = Histogram::value_of(index);
            let error = mid.abs_diff(value) as f64 / value.max(1) as f64;
            assert!(error <= 1.0 / SUB as f64, "{value} -> {mid}");
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Histogram::new();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(50.0) as f64;
        let p99 = h.percentile(99.0) as f64;
        assert!((p50 / 500_000.0 - 1.0).abs() < 0.02, "p50 {p50}");
        assert!((p99 / 990_000.0 - 1.0).abs() < 0.02, "p99 {p99}");
        let mut other = Histogram::new();
        for _ in 0..3000 {
            other.record(10);
        }
        h.merge(&other);
        assert_eq!(h.percentile(50.0), 10);
        assert_eq!(Histogram::new().percentile(99.0), 0);
    }
}
