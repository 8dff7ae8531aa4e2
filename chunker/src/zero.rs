/// True when every byte is zero.
///
/// Folds 16-byte words with OR so the compiler emits wide vector loads; VM disks are mostly zeros and
/// this runs over every byte read, so it must go at memory speed.
pub fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(64);
    for block in &mut words {
        let mut acc = 0u128;
        for w in block.chunks_exact(16) {
            acc |= u128::from_ne_bytes(w.try_into().expect("16-byte slice"));
        }
        if acc != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_any_nonzero_byte() {
        for len in [0usize, 1, 15, 16, 63, 64, 65, 4096, 4099] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v));
            for i in 0..len {
                v[i] = 1;
                assert!(!is_zero(&v), "len {len} byte {i}");
                v[i] = 0;
            }
        }
    }
}
