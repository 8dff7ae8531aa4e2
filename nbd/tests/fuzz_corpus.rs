//! Replays the committed fuzz corpus (nbd/fuzz/corpus/<target>/) through the same entry points
//! the fuzz targets call, so every seed and every past crash input runs in plain `cargo test`.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "corpus for {target} is too small: {}",
        files.len()
    );
    for path in files {
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{target} input {} panicked", path.display());
    }
}

#[test]
fn request_decoder_corpus() {
    replay("request_decoder", blockvault_nbd::fuzzing::request_stream);
}

#[test]
fn option_parser_corpus() {
    replay("option_parser", blockvault_nbd::fuzzing::option_stream);
}

/// The corpus seeds are not trivially rejected: the decoders produce frames from them.
#[test]
fn seeds_decode_to_frames() {
    use blockvault_nbd::codec::{OptionCodec, RequestCodec};
    use tokio_util::codec::Decoder;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let data = read("request_decoder/seed-pipelined");
    let mut buf = bytes::BytesMut::from(&data[1..]);
    let mut n = 0;
    while let Some(_req) = RequestCodec::default().decode(&mut buf).unwrap() {
        n += 1;
    }
    assert_eq!(n, 16);
    let data = read("option_parser/seed-meta-list-set");
    let mut buf = bytes::BytesMut::from(&data[1..]);
    let mut codec = OptionCodec::default();
    let mut frames = 0;
    while codec.decode(&mut buf).unwrap().is_some() {
        frames += 1;
    }
    assert_eq!(frames, 5, "client flags and four options");
}
