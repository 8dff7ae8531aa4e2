//! LZNT1 decompression, the algorithm of NTFS compressed files ([MS-XCA] section 2.5, "LZNT1
//! Algorithm Details"). A compressed buffer is a series of chunks, each standing for up to 4096
//! bytes of output:
//!
//! - a 2-byte little-endian chunk header: bits 0-11 hold the chunk's stored size (header
//!   included) minus 3, bits 12-14 the signature 3, bit 15 set when the chunk is compressed; a
//!   zero header ends the buffer;
//! - an uncompressed chunk is its bytes as they are;
//! - a compressed chunk is groups of one flag byte and up to 8 tokens, flag bits read from the
//!   lowest: 0 = a literal byte, 1 = a 2-byte little-endian copy token. A copy token's high bits
//!   are the displacement minus 1 and its low bits the length minus 3; the split depends on how far
//!   into the chunk's output the token is: 4 displacement bits up to position 16, one more bit each
//!   time the position doubles (at most 12 bits).
//!
//! Each chunk decodes to the next 4096-byte slot of the output; a chunk that yields fewer bytes
//! leaves the rest of its slot zero (how NTFS stores a unit ending in zeros).

const CHUNK: usize = 4096;

/// A compressed buffer that does not decode.
#[derive(Debug, PartialEq, Eq)]
pub struct Lznt1Error(pub String);

impl std::fmt::Display for Lznt1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Appends the decompression of `input` to `out`, producing at most `limit` bytes.
pub fn decompress(input: &[u8], out: &mut Vec<u8>, limit: usize) -> Result<(), Lznt1Error> {
    let base = out.len();
    let mut i = 0usize;
    while i + 2 <= input.len() && out.len() - base < limit {
        let header = u16::from_le_bytes([input[i], input[i + 1]]);
        if header == 0 {
            break;
        }
        let stored = (header & 0x0fff) as usize + 1; // bytes after the header
        let compressed = header & 0x8000 != 0;
        let start = i + 2;
        let end = start + stored;
        if end > input.len() {
            return Err(Lznt1Error(format!(
                "a chunk at byte {i} claims {stored} bytes, {} are left",
                input.len() - start
            )));
        }
        // Every chunk starts at the next 4096-byte slot of the output.
        let slot = out.len() - base;
        let slot = slot.div_ceil(CHUNK) * CHUNK;
        if slot >= limit {
            break;
        }
        out.resize(base + slot, 0);
        let chunk_start = out.len();
        if !compressed {
            let n = stored.min(CHUNK);
            out.extend_from_slice(&input[start..start + n]);
        } else {
            decode_chunk(&input[start..end], out, chunk_start)?;
        }
        i = end;
    }
    out.truncate(base + limit.min(out.len() - base));
    Ok(())
}

fn decode_chunk(data: &[u8], out: &mut Vec<u8>, chunk_start: usize) -> Result<(), Lznt1Error> {
    let mut i = 0usize;
    while i < data.len() {
        let flags = data[i];
        i += 1;
        for bit in 0..8 {
            if i >= data.len() {
                return Ok(());
            }
            let pos = out.len() - chunk_start;
            if pos >= CHUNK {
                return Err(Lznt1Error("a chunk decodes to more than 4096 bytes".into()));
            }
            if flags & (1 << bit) == 0 {
                out.push(data[i]);
                i += 1;
                continue;
            }
            if i + 2 > data.len() {
                return Err(Lznt1Error("a copy token is cut off".into()));
            }
            let token = u16::from_le_bytes([data[i], data[i + 1]]) as usize;
            i += 2;
            let mut dbits = 4;
            let mut p = pos.saturating_sub(1);
            while p >= 0x10 {
                dbits += 1;
                p >>= 1;
            }
            let lbits = 16 - dbits;
            let len = (token & ((1 << lbits) - 1)) + 3;
            let disp = (token >> lbits) + 1;
            if disp > pos {
                return Err(Lznt1Error(format!(
                    "a copy token reaches {disp} bytes back from position {pos}"
                )));
            }
            if pos + len > CHUNK {
                return Err(Lznt1Error("a copy runs past the end of its chunk".into()));
            }
            let from = out.len() - disp;
            for k in 0..len {
                let b = out[from + k];
                out.push(b);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_copies() {
        // "abcabcabcabc": 3 literals then a copy of 9 from 3 back.
        // flags 0b1000: tokens 0..2 literal, token 3 copy; pos 3 -> 4 displacement bits, 12
        // length bits: token = (3-1)<<12 | (9-3).
        let token: u16 = (2 << 12) | 6;
        let mut chunk = vec![0b1000u8, b'a', b'b', b'c'];
        chunk.extend_from_slice(&token.to_le_bytes());
        let header: u16 = 0xb000 | (chunk.len() as u16 - 1);
        let mut input = header.to_le_bytes().to_vec();
        input.extend_from_slice(&chunk);
        let mut out = Vec::new();
        decompress(&input, &mut out, 65536).unwrap();
        assert_eq!(out, b"abcabcabcabc");
    }

    #[test]
    fn bad_tokens_are_errors_not_panics() {
        for input in [
            vec![0x05, 0xb0, 0x01, 0xff, 0xff],
            vec![0xff, 0xbf],
            vec![0x02, 0xb0, 0xff, 0x00, 0x00, 0x00],
        ] {
            let mut out = Vec::new();
            let _ = decompress(&input, &mut out, 65536);
            assert!(out.len() <= 65536);
        }
    }
}
