//! GUIDs as stored in VHDX structures (MS-VHDX §1.3 / [MS-DTYP] GUID packet
//! representation: the first three fields little-endian, the last eight bytes
//! as they are).

use std::fmt;

/// A GUID kept in its on-disk byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    /// Builds a GUID from its textual fields (`d1-d2-d3-d4`).
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Guid {
        let mut g = [0u8; 16];
        g.copy_from_slice(&b[..16]);
        Guid(g)
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A random (version 4) GUID.
    pub fn random() -> Guid {
        let mut b: [u8; 16] = rand::random();
        b[7] = (b[7] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// Parses `{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}` (braces optional, any case).
    pub fn parse(s: &str) -> Option<Guid> {
        let s = s.trim();
        let s = s
            .strip_prefix('{')
            .and_then(|t| t.strip_suffix('}'))
            .unwrap_or(s);
        let parts: Vec<&str> = s.split('-').collect();
        if parts.len() != 5 {
            return None;
        }
        let lens = [8, 4, 4, 4, 12];
        for (p, l) in parts.iter().zip(lens) {
            if p.len() != l || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
        }
        let d1 = u32::from_str_radix(parts[0], 16).ok()?;
        let d2 = u16::from_str_radix(parts[1], 16).ok()?;
        let d3 = u16::from_str_radix(parts[2], 16).ok()?;
        let mut d4 = [0u8; 8];
        let tail = format!("{}{}", parts[3], parts[4]);
        for (i, b) in d4.iter_mut().enumerate() {
            *b = u8::from_str_radix(&tail[i * 2..i * 2 + 2], 16).ok()?;
        }
        Some(Guid::from_fields(d1, d2, d3, d4))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        let d1 = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let d2 = u16::from_le_bytes([b[4], b[5]]);
        let d3 = u16::from_le_bytes([b[6], b[7]]);
        write!(
            f,
            "{{{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_text() {
        let g = Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}").unwrap();
        assert_eq!(g.to_string(), "{2dc27766-f623-4200-9d64-115e9bfd4a08}");
        assert_eq!(&g.0[..4], &[0x66, 0x77, 0xc2, 0x2d]);
        assert_eq!(Guid::parse("2dc27766-f623-4200-9d64-115e9bfd4a08"), Some(g));
        assert_eq!(Guid::parse("{2dc27766-f623-4200-9d64-115e9bfd4a0}"), None);
        assert_eq!(Guid::parse("{2dc27766-f623-4200-9d64+115e9bfd4a08}"), None);
        let r = Guid::random();
        assert_eq!(Guid::parse(&r.to_string()), Some(r));
    }
}
