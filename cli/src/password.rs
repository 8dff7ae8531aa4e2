//! Where the repository password comes from: `BLOCKVAULT_PASSWORD`, `--password-file`, or a prompt
//! on a terminal. Never from a command-line argument, which other users could read in `ps`.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::{bail, Context, Result};
/// A password, wiped from memory when dropped.
pub type Password = zeroize::Zeroizing<Vec<u8>>;

pub fn from_file(path: &Path) -> Result<Password> {
    let mut s =
        std::fs::read(path).with_context(|| format!("reading password file {}", path.display()))?;
    while matches!(s.last(), Some(b'\n' | b'\r')) {
        s.pop();
    }
    if s.is_empty() {
        bail!("password file {} is empty", path.display());
    }
    Ok(Password::new(s))
}

/// Reads the password; `confirm` asks twice on a terminal (for a new repository).
pub fn obtain(file: Option<&Path>, confirm: bool) -> Result<Password> {
    if let Some(f) = file {
        return from_file(f);
    }
    if let Some(v) = std::env::var_os("BLOCKVAULT_PASSWORD") {
        let v = v.into_encoded_bytes();
        if v.is_empty() {
            bail!("BLOCKVAULT_PASSWORD is set but empty");
        }
        return Ok(Password::new(v));
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "no password: set BLOCKVAULT_PASSWORD, pass --password-file FILE, or run on a terminal"
        );
    }
    let first = zeroize::Zeroizing::new(
        rpassword::prompt_password("repository password: ").context("reading password")?,
    );
    if first.is_empty() {
        bail!("empty password");
    }
    if confirm {
        let again = zeroize::Zeroizing::new(
            rpassword::prompt_password("repeat password: ").context("reading password")?,
        );
        if *again != *first {
            bail!("the passwords do not match");
        }
    }
    Ok(Password::new(first.as_bytes().to_vec()))
}
