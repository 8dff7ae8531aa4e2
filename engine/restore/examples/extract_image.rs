//! Extracts a path from a disk image file on the host, the file-level restore without a
//! repository, for measuring the file-system reader alone:
//! `extract_image IMAGE PATH DIR [THREADS]` (THREADS: file writers beside the walking thread;
//! by default as many as there are cores, at most 4).

use std::sync::Arc;

use blockvault_restore::*;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 && a.len() != 5 {
        eprintln!("usage: extract_image IMAGE PATH DIR [THREADS]");
        std::process::exit(2);
    }
    let dev: Arc<dyn ReadAt> =
        Arc::new(FileDisk::open(std::path::Path::new(&a[1])).expect("the image opens"));
    let t = partitions(&dev).expect("a partition table or a whole-disk file system");
    let sel = t.partitions.first().expect("a file system").selector();
    let mut v = open_volume(&dev, &t, &sel).expect("a readable file system");
    let mut opts = ExtractOptions::default();
    if let Some(n) = a.get(4) {
        opts.threads = n.parse().expect("THREADS is a number");
    }
    let path = split_path(&a[2]).expect("a plain path");
    match extract(v.as_mut(), &path, std::path::Path::new(&a[3]), &opts) {
        Ok(r) => println!("{r:?}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
