//! Byte-range merging shared by the reader and the changed-ranges parser. Kept here rather than
//! taken from the chunker so this crate depends on no other blockvault crate.

use std::ops::Range;

/// Sorted, merged (overlapping or touching ranges joined), non-empty ranges.
pub(crate) fn merge(v: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = v.into_iter().filter(|r| r.start < r.end).collect();
    v.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn merges_overlapping_touching_and_drops_empty() {
        assert_eq!(
            merge(vec![10..20, 0..5, 5..7, 15..30, 40..40, 50..60]),
            vec![0..7, 10..30, 50..60]
        );
        assert!(merge(vec![3..3]).is_empty());
    }
}
