//! Magic numbers, versions and fixed sizes of every stored object. `docs/FORMAT.md` describes the
//! layouts in prose; the two must agree. Changing any value here breaks existing repositories.

/// Version of the repository format written by this build.
pub const REPO_VERSION: u32 = 1;

/// `config` object `format` field.
pub const CONFIG_FORMAT: &str = "blockvault-repository";

/// Pack header: magic, then the 16-byte pack id.
pub const PACK_MAGIC: [u8; 8] = *b"BVPACK\x00\x01";
pub const PACK_HEADER_LEN: usize = 8 + 16;
/// Pack trailer: table-of-contents length (u32 LE), then this magic.
pub const PACK_TRAILER_MAGIC: [u8; 8] = *b"BVPTOC\x00\x01";
pub const PACK_TRAILER_LEN: usize = 4 + 8;
/// Upper bound on a table of contents, so a hostile trailer cannot make us allocate gigabytes.
pub const MAX_TOC_LEN: u32 = 64 << 20;

/// Blob header: version, kind, compression, reserved.
pub const BLOB_VERSION: u8 = 1;
pub const BLOB_HEADER_LEN: usize = 4;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes a blob adds to its (compressed) payload.
pub const BLOB_OVERHEAD: usize = BLOB_HEADER_LEN + NONCE_LEN + TAG_LEN;

pub const COMPRESSION_NONE: u8 = 0;
pub const COMPRESSION_ZSTD: u8 = 1;

/// Version byte that starts every plaintext table of contents, segment and page.
pub const TOC_VERSION: u8 = 1;
pub const SEGMENT_VERSION: u8 = 1;
pub const PAGE_VERSION: u8 = 1;
pub const MANIFEST_VERSION: u32 = 1;

/// One table-of-contents entry: chunk id 32, kind 1, offset 4, stored length 4, raw length 4.
pub const TOC_ENTRY_LEN: usize = 32 + 1 + 4 + 4 + 4;

/// Associated-data labels: each sealed object is bound to its kind and its name, so no object can be
/// swapped for another (a segment served as a manifest, pack A's table served for pack B, ...).
pub const AAD_KEY_WRAP: &[u8] = b"blockvault/v1/key-wrap";
pub const AAD_BLOB: &[u8] = b"blockvault/v1/blob";
pub const AAD_TOC: &[u8] = b"blockvault/v1/pack-toc";
pub const AAD_SEGMENT: &[u8] = b"blockvault/v1/index-segment";
pub const AAD_MANIFEST: &[u8] = b"blockvault/v1/point";
pub const AAD_BOOT_TRACE: &[u8] = b"blockvault/v1/boot-trace";

/// BLAKE3 `derive_key` contexts for the subkeys of the master key.
pub const KDF_CONTEXT_ID: &str = "blockvault 2026-11-21 chunk id key v1";
pub const KDF_CONTEXT_DATA: &str = "blockvault 2026-11-21 blob encryption key v1";
pub const KDF_CONTEXT_META: &str = "blockvault 2026-11-21 metadata encryption key v1";
pub const KDF_CONTEXT_CONFIG_MAC: &str = "blockvault 2026-11-21 config mac key v1";

/// Object names.
pub const CONFIG_PATH: &str = "config";
pub const PACKS_DIR: &str = "packs";
pub const INDEX_DIR: &str = "index";
pub const POINTS_DIR: &str = "points";
pub const BOOT_TRACES_DIR: &str = "boot-traces";
pub const BOOT_TRACE_VERSION: u32 = 1;
