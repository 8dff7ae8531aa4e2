//! A panic inside a third-party parser is caught and reported in the error, and the panic hook
//! keeps quiet about it; a panic anywhere else still reaches the hook that was installed before.
//! In a test binary of its own: it installs a process-wide panic hook.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use blockvault_restore::*;

static HOOK_CALLS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn a_caught_parser_panic_is_reported_once_and_other_panics_reach_the_hook() {
    std::panic::set_hook(Box::new(|_| {
        HOOK_CALLS.fetch_add(1, Ordering::SeqCst);
    }));
    // An NTFS index entry the `ntfs` crate panics on while listing (found by fuzzing).
    let seed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/disk_image/ntfs-index-entry-panics");
    let image = decode_sparse(&std::fs::read(&seed).unwrap()).expect("a sparse-encoded image");
    let dev: Arc<dyn ReadAt> = Arc::new(MemDisk::new(image));
    let table = partitions(&dev).unwrap();
    let mut errors = Vec::new();
    for p in &table.partitions {
        let Ok(mut vol) = open_volume(&dev, &table, &p.selector()) else {
            continue;
        };
        let mut dirs = vec![Vec::new()];
        while let Some(dir) = dirs.pop() {
            match vol.list(&dir, 1000) {
                Ok(l) => dirs.extend(
                    l.entries
                        .into_iter()
                        .filter(|e| e.kind == EntryKind::Dir)
                        .map(|e| [dir.clone(), vec![e.raw_name]].concat()),
                ),
                Err(e) => errors.push(e.to_string()),
            }
        }
    }
    let caught: Vec<_> = errors
        .iter()
        .filter(|e| e.contains("the parser gave up"))
        .collect();
    assert!(!caught.is_empty(), "no caught panic: {errors:?}");
    assert!(caught[0].contains("ntfs-0.4.0/src/"), "{caught:?}");
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 0, "{caught:?}");

    let outside = std::panic::catch_unwind(|| panic!("not in a parser"));
    assert!(outside.is_err());
    assert_eq!(HOOK_CALLS.load(Ordering::SeqCst), 1);
}
