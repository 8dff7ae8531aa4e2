//! A bound on glibc's malloc arenas. glibc gives each thread that allocates under contention an
//! arena of its own (up to eight per core), and every arena keeps the large buffers freed in it
//! for reuse. blockvault reads packs and looks chunks up on many threads, so without a bound its
//! peak memory grows with how many threads ever ran rather than with the work in flight
//! (docs/OPERATIONS.md, "Memory"). glibc reads the bound from the environment only when a process
//! starts, so the binary sets it and executes itself again, once, under the same process id.

/// Executes this binary again with `MALLOC_ARENA_MAX=2` unless the variable is set already (by
/// the user, or by the first pass). Returns only when it did not execute.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn bound() {
    use std::os::unix::process::CommandExt;
    // The variable glibc reads, and the value used when the user has not set it.
    const VAR: &str = "MALLOC_ARENA_MAX";
    const ARENAS: &str = "2";
    if std::env::var_os(VAR).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(argv0) = args.next() {
        cmd.arg0(argv0);
    }
    // `exec` returns only when it failed (the binary was replaced or removed): run on unbounded.
    let _ = cmd.args(args).env(VAR, ARENAS).exec();
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn bound() {}
