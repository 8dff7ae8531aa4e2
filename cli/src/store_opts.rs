//! Translates the global object-store options (endpoint, concurrency, bandwidth, cache) into
//! what the repository layer takes.

use anyhow::{anyhow, Result};
use blockvault_repo::StoreOptions;

use crate::exit::InputError;
use crate::size::parse_size;
use crate::Global;

/// Parses a rate such as `50MiB/s`, `4MiB`, `800KB/s` into bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    let v = parse_size(t).map_err(|e| format!("rate {e} (example: 50MiB/s)"))?;
    if v == 0 {
        return Err(format!("rate '{s}' must be above zero"));
    }
    Ok(v)
}

pub fn store_options(g: &Global) -> Result<StoreOptions> {
    let input = |e: String| anyhow!(InputError(e));
    let mut o = StoreOptions {
        s3_endpoint: g.s3_endpoint.clone(),
        s3_allow_http: g.s3_allow_http,
        ..StoreOptions::default()
    };
    if let Some(n) = g.s3_concurrency {
        if n == 0 {
            return Err(input("--s3-concurrency must be at least 1".into()));
        }
        o.concurrency = n;
    }
    if let Some(r) = &g.limit_upload {
        o.limit_upload = Some(parse_rate(r).map_err(|e| input(format!("--limit-upload: {e}")))?);
    }
    if let Some(r) = &g.limit_download {
        o.limit_download =
            Some(parse_rate(r).map_err(|e| input(format!("--limit-download: {e}")))?);
    }
    if let Some(c) = &g.cache_size {
        o.cache_size = parse_size(c).map_err(|e| input(format!("--cache-size: {e}")))?;
    }
    // Hidden knobs for tests and operators who need a shorter outage budget.
    if let Some(v) = std::env::var("BLOCKVAULT_S3_RETRY_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        o.retry_timeout = std::time::Duration::from_secs(v);
    }
    if let Some(v) = std::env::var("BLOCKVAULT_S3_REQUEST_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        o.request_timeout = std::time::Duration::from_secs(v.max(1));
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("4MiB/s").unwrap(), 4 << 20);
        assert_eq!(parse_rate("800KB").unwrap(), 800_000);
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").unwrap_err().contains("fast"));
    }
}
