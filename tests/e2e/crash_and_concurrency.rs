//! A backup killed at any moment leaves a consistent repository, and two backups at once both
//! succeed and deduplicate against each other.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

fn wait_for_packs(w: &World, n: usize, child: &mut std::process::Child) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if w.packs().len() >= n {
            return true;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("backup ended ({status}) before {n} packs were written");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn killed_backups_leave_a_consistent_repository_and_are_resumed() {
    let w = World::with_repo("64KiB");
    let img = w.path("big.raw");
    // Random data: 128 packs of 1 MiB, so there is a long window to kill the backup in.
    make_random_image(&img, 128 << 20, 11);
    let spec = format!("d={}", img.display());
    let args = [
        "backup",
        "--vm",
        "vm",
        "--disk",
        &spec,
        "--pack-size",
        "1MiB",
        "--json",
    ];

    for (round, packs_before_kill) in [2usize, 7, 15].into_iter().enumerate() {
        let already = w.packs().len();
        let mut child = w
            .cmd(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            wait_for_packs(&w, already + packs_before_kill, &mut child),
            "round {round}: no progress"
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let points = w.json(&["points", "list"]);
        assert_eq!(
            points.as_array().unwrap().len(),
            0,
            "a killed backup must not leave a point"
        );
        w.ok(&["verify", "--read-data"]);
    }

    let done = w.json(&args[..args.len() - 1]);
    let new = done["bytes_new"].as_u64().unwrap();
    let read = done["bytes_read"].as_u64().unwrap();
    assert!(
        new < read,
        "the resumed backup should reuse uploaded chunks: new {new} of {read}"
    );
    let out = w.path("o.raw");
    w.export(done["point"].as_str().unwrap(), "d", &out);
    assert!(same_content(&img, &out));
    w.ok(&["verify", "--read-data"]);

    // And with the local index gone too, the chunks of killed runs are found in the packs.
    std::fs::remove_dir_all(&w.cache).unwrap();
    let again = w.json(&args[..args.len() - 1]);
    assert_eq!(again["bytes_new"].as_u64().unwrap(), 0, "{again}");
}

#[test]
fn two_backups_at_once_both_succeed_and_deduplicate() {
    let w = World::with_repo("64KiB");
    let (a, b) = (w.path("a.raw"), w.path("b.raw"));
    make_random_image(&a, 96 << 20, 21);
    std::fs::copy(&a, &b).unwrap();
    mutate_image(&b, 22, 4, 200_000);

    let spec_a = format!("d={}", a.display());
    let spec_b = format!("d={}", b.display());
    let run = |spec: &str, workers: &str| {
        w.cmd(&[
            "backup",
            "--vm",
            "vm",
            "--disk",
            spec,
            "--pack-size",
            "1MiB",
            "--packs-per-segment",
            "1",
            "--workers",
            workers,
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let mut first = run(&spec_a, "2");
    // Let the first get a quarter ahead, as a second agent starting a little later would. The
    // second catches up (deduplicated chunks cost only a hash) and from then on both race for the
    // same new chunks, which both may store: the guarantee is about what was already stored.
    assert!(wait_for_packs(&w, 24, &mut first));
    let stored_before: u64 = w
        .packs()
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let second = run(&spec_b, "1");
    let (oa, ob) = (
        first.wait_with_output().unwrap(),
        second.wait_with_output().unwrap(),
    );
    assert!(
        oa.status.success(),
        "first: {}",
        String::from_utf8_lossy(&oa.stderr)
    );
    assert!(
        ob.status.success(),
        "second: {}",
        String::from_utf8_lossy(&ob.stderr)
    );
    let ja: serde_json::Value = serde_json::from_slice(&oa.stdout).unwrap();
    let jb: serde_json::Value = serde_json::from_slice(&ob.stdout).unwrap();
    let (new_a, new_b) = (
        ja["bytes_new"].as_u64().unwrap(),
        jb["bytes_new"].as_u64().unwrap(),
    );
    // How much of the race each side wins depends on the machine's load; what was stored before
    // the second started is never stored again. So the second stores at most what was missing
    // then, plus its own changes (4 writes of under 200,000 bytes: at most 5 chunks of 64 KiB
    // each), plus slack for pack overhead and for a pack whose index entry was not yet visible.
    let changed = 4 * 5 * (64 << 10);
    let slack = stored_before / 100 + (2 << 20);
    let bound = (96u64 << 20).saturating_sub(stored_before) + changed + slack;
    assert!(
        new_b <= bound,
        "the second backup stored {new_b} bytes, more than the {bound} it could not reuse \
         ({stored_before} bytes were stored before it started; the first stored {new_a})"
    );
    for (img, j) in [(&a, &ja), (&b, &jb)] {
        let out = w.path("o.raw");
        w.export(j["point"].as_str().unwrap(), "d", &out);
        assert!(same_content(img, &out));
    }
    w.ok(&["verify", "--read-data"]);
}
