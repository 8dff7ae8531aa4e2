use std::ops::Range;

/// A normalised set of byte ranges: sorted, non-empty, non-overlapping and non-adjacent.
///
/// Changed-block lists from RCT, allocated extents of a VHDX and holes of a raw file all arrive as
/// unordered, overlapping ranges; the backup pipeline wants them merged, clipped to the disk and
/// rounded outward to chunk boundaries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<Range<u64>>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn full(len: u64) -> Self {
        Self::from_ranges(std::iter::once(0..len))
    }

    pub fn from_ranges<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut v: Vec<Range<u64>> = iter.into_iter().filter(|r| r.start < r.end).collect();
        v.sort_unstable_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        Self { ranges: out }
    }

    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn total_len(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    pub fn contains(&self, offset: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= offset);
        self.ranges.get(i).is_some_and(|r| r.start <= offset)
    }

    /// Cuts every range to `[0, limit)`.
    pub fn clip(&self, limit: u64) -> Self {
        Self::from_ranges(
            self.ranges
                .iter()
                .map(|r| r.start.min(limit)..r.end.min(limit)),
        )
    }

    /// Widens every range to whole `align`-sized units, then clips to `limit`.
    pub fn round_out(&self, align: u64, limit: u64) -> Self {
        assert!(align > 0, "alignment must be positive");
        Self::from_ranges(self.ranges.iter().map(|r| {
            let start = r.start / align * align;
            let end = r.end.div_ceil(align).saturating_mul(align);
            start.min(limit)..end.min(limit)
        }))
    }

    pub fn union(&self, other: &Self) -> Self {
        Self::from_ranges(self.ranges.iter().chain(other.ranges.iter()).cloned())
    }

    pub fn intersect(&self, other: &Self) -> Self {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = (&self.ranges[i], &other.ranges[j]);
            let start = a.start.max(b.start);
            let end = a.end.min(b.end);
            if start < end {
                out.push(start..end);
            }
            if a.end < b.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        Self { ranges: out }
    }

    /// The parts of `[0, limit)` not in this set.
    pub fn complement(&self, limit: u64) -> Self {
        let mut out = Vec::new();
        let mut pos = 0;
        for r in self.clip(limit).ranges {
            if r.start > pos {
                out.push(pos..r.start);
            }
            pos = r.end;
        }
        if pos < limit {
            out.push(pos..limit);
        }
        Self { ranges: out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(ranges: &[Range<u64>], limit: u64) -> Vec<bool> {
        let mut bits = vec![false; limit as usize];
        for r in ranges {
            for b in r.start.min(limit)..r.end.min(limit) {
                bits[b as usize] = true;
            }
        }
        bits
    }

    fn bits(set: &RangeSet, limit: u64) -> Vec<bool> {
        naive(set.ranges(), limit)
    }

    fn arb_ranges() -> impl Strategy<Value = Vec<Range<u64>>> {
        proptest::collection::vec((0u64..300, 0u64..60).prop_map(|(s, l)| s..s + l), 0..12)
    }

    proptest! {
        #[test]
        fn normalised_and_equivalent(rs in arb_ranges()) {
            let set = RangeSet::from_ranges(rs.clone());
            for w in set.ranges().windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            prop_assert!(set.ranges().iter().all(|r| r.start < r.end));
            prop_assert_eq!(bits(&set, 400), naive(&rs, 400));
            for o in 0..400 {
                prop_assert_eq!(set.contains(o), naive(&rs, 400)[o as usize]);
            }
        }

        #[test]
        fn round_out_covers_and_aligns(rs in arb_ranges(), align in 1u64..40, limit in 0u64..400) {
            let set = RangeSet::from_ranges(rs.clone()).round_out(align, limit);
            let orig = naive(&rs, limit);
            let got = bits(&set, limit);
            for (i, &b) in orig.iter().enumerate() {
                prop_assert!(!b || got[i]);
            }
            for r in set.ranges() {
                prop_assert!(r.start % align == 0);
                prop_assert!(r.end % align == 0 || r.end == limit);
                prop_assert!(r.end <= limit);
            }
        }

        #[test]
        fn set_ops_match_bits(a in arb_ranges(), b in arb_ranges()) {
            let (sa, sb) = (RangeSet::from_ranges(a.clone()), RangeSet::from_ranges(b.clone()));
            let (na, nb) = (naive(&a, 400), naive(&b, 400));
            let inter: Vec<bool> = na.iter().zip(&nb).map(|(x, y)| *x && *y).collect();
            let uni: Vec<bool> = na.iter().zip(&nb).map(|(x, y)| *x || *y).collect();
            let comp: Vec<bool> = na.iter().map(|x| !x).collect();
            prop_assert_eq!(bits(&sa.intersect(&sb), 400), inter);
            prop_assert_eq!(bits(&sa.union(&sb), 400), uni);
            prop_assert_eq!(bits(&sa.complement(400), 400), comp);
            prop_assert_eq!(sa.total_len(), na.iter().filter(|x| **x).count() as u64);
        }
    }
}
