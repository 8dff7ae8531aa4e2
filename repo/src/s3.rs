//! Opening `s3://BUCKET/PREFIX` locations: Amazon S3 or any S3-compatible service.
//!
//! Credentials come only from the standard `AWS_*` environment variables (or the instance
//! metadata service), never from the location string, so nothing that is shown to users or
//! written to logs can contain them.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::aws::AmazonS3ConfigKey;
use object_store::path::Path as ObjPath;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ClientOptions, ObjectStore, RetryConfig};

use crate::paced_http::PacedConnector;
use crate::throttle::TokenBucket;
use crate::{Error, RemoteProblem, Result};

/// How a remote object store is reached. Defaults suit Amazon S3 itself.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Endpoint of an S3-compatible service (e.g. `http://127.0.0.1:9000`); `None` means AWS,
    /// or `AWS_ENDPOINT_URL` when set.
    pub s3_endpoint: Option<String>,
    /// Allow plain-HTTP endpoints (S3-compatible services on a trusted network).
    pub s3_allow_http: bool,
    /// Requests in flight at once against the store.
    pub concurrency: usize,
    /// Upload and download limits in bytes per second.
    pub limit_upload: Option<u64>,
    pub limit_download: Option<u64>,
    /// Bound of the on-disk cache of blobs read from a remote store; 0 disables it.
    pub cache_size: u64,
    /// The store's own per-request retry budget (server errors, timeouts, resets).
    pub max_retries: usize,
    pub retry_timeout: Duration,
    /// A request that makes no progress for this long is abandoned (and retried): no body bytes
    /// taken by the connection, no answer after the body, or no answer bytes. Not a deadline for
    /// the whole request, so slow links still carry whole packs.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            s3_endpoint: None,
            s3_allow_http: false,
            concurrency: 16,
            limit_upload: None,
            limit_download: None,
            cache_size: 1 << 30,
            max_retries: 8,
            retry_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A parsed `s3://BUCKET/PREFIX`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    pub prefix: String,
}

impl S3Location {
    pub fn parse(location: &str) -> Result<Self> {
        let rest = location
            .strip_prefix("s3://")
            .ok_or_else(|| Error::Invalid(format!("'{location}' is not an s3:// location")))?;
        if rest.contains('@') || rest.contains('?') {
            // user:secret@bucket and ?secret=... forms would put credentials where they get
            // displayed: the message names the bucket only (after any userinfo, before any
            // path or query).
            let bucket = rest
                .split('?')
                .next()
                .unwrap_or_default()
                .rsplit('@')
                .next()
                .unwrap_or_default()
                .split('/')
                .next()
                .unwrap_or_default();
            return Err(Error::Invalid(format!(
                "repository location s3://{bucket}/...: credentials and query parameters are not \
                 accepted in the location; set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead"
            )));
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid_bucket = !bucket.is_empty()
            && bucket.len() <= 63
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(Error::Invalid(format!(
                "repository location '{location}': '{bucket}' is not a valid bucket name"
            )));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|p| p == "." || p == "..") {
            return Err(Error::Invalid(format!(
                "repository location '{location}': prefix may not contain . or .."
            )));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// The location as shown to users.
    pub fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Builds the S3 client for `loc`: standard AWS environment, explicit endpoint, bounded
/// per-request retries with exponential backoff and jitter, and the repository prefix applied.
pub fn open_s3(loc: &S3Location, opts: &StoreOptions) -> Result<Arc<dyn ObjectStore>> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(&loc.bucket);
    if let Some(ep) = &opts.s3_endpoint {
        b = b.with_endpoint(ep);
    }
    let region_set = ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if !region_set {
        b = b.with_region("us-east-1");
    }
    // `AWS_ALLOW_HTTP=true` (object_store's own variable) counts like --s3-allow-http; the
    // client options set below would otherwise silently replace it.
    if let Some(ep) = b.get_config_value(&AmazonS3ConfigKey::Endpoint) {
        refuse_userinfo(loc, &ep)?;
    }
    let allow_http = opts.s3_allow_http
        || b.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp))
            .is_some_and(|v| truthy(&v));
    if let Some(ep) = b.get_config_value(&AmazonS3ConfigKey::Endpoint) {
        if ep.trim().to_ascii_lowercase().starts_with("http://") && !allow_http {
            // The client would refuse every request (and retry each for minutes): say it once.
            return Err(Error::Remote {
                location: loc.display(),
                kind: RemoteProblem::PlainHttp,
                problem: format!(
                    "the S3 endpoint {} is plain HTTP, which is refused unless allowed",
                    without_userinfo(&ep)
                ),
                fix: "use an https:// endpoint, or pass --s3-allow-http (or set \
                      AWS_ALLOW_HTTP=true) for a service on a trusted network"
                    .into(),
            });
        }
    }
    b = b
        .with_allow_http(allow_http)
        // Every object is sealed with AES-256-GCM and checked on read, so hashing each body for
        // the request signature would cost a SHA-256 pass over every uploaded byte and protect
        // nothing more (HTTPS covers transport; the signature still covers the request itself).
        .with_unsigned_payload(true)
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(10),
                base: 2.0,
            },
            max_retries: opts.max_retries,
            retry_timeout: opts.retry_timeout,
        })
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(allow_http)
                .with_connect_timeout(opts.connect_timeout),
        )
        // Our own HTTP client: uploads paced as they are sent, and timeouts on progress rather
        // than one whole-request deadline (see paced_http).
        .with_http_connector(PacedConnector {
            upload: opts.limit_upload.map(|r| Arc::new(TokenBucket::new(r))),
            idle: opts.request_timeout,
            connect: opts.connect_timeout,
        });
    // The builder's own errors name configuration keys, never their values.
    let s3 = b
        .build()
        .map_err(|e| Error::Invalid(format!("{}: {e}", loc.display())))?;
    if loc.prefix.is_empty() {
        Ok(Arc::new(s3))
    } else {
        Ok(Arc::new(PrefixStore::new(
            s3,
            ObjPath::from(loc.prefix.as_str()),
        )))
    }
}

/// True for the values object_store reads as true in its boolean settings.
pub(crate) fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "on" | "yes" | "y"
    )
}

/// An endpoint as shown in messages: any `user:secret@` part of its authority removed.
fn without_userinfo(ep: &str) -> String {
    let Some(s) = ep.find("://") else {
        return ep.to_string();
    };
    let rest = &ep[s + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    match authority.rfind('@') {
        Some(at) => format!("{}{}", &ep[..s + 3], &rest[at + 1..]),
        None => ep.to_string(),
    }
}

/// Refuses an endpoint with `user:secret@` in it (from --s3-endpoint or AWS_ENDPOINT_URL): the
/// S3 client would keep it in every request URL, and its error texts print that URL, so the
/// secret would reach messages, `--json` output and logs. The message shows the endpoint without
/// it.
fn refuse_userinfo(loc: &S3Location, ep: &str) -> Result<()> {
    let shown = without_userinfo(ep);
    if shown == ep {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: the S3 endpoint {shown} was given with credentials (user:password@ before the \
         host), which are not accepted there; give the endpoint without them and set \
         AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead",
        loc.display()
    )))
}

/// The S3 error code in an error response body (`<Code>NoSuchBucket</Code>`), if any.
fn error_code(text: &str) -> Option<&str> {
    let start = text.find("<Code>")? + "<Code>".len();
    let len = text[start..].find("</Code>")?;
    Some(&text[start..start + len])
}

/// Classifies an object-store error that no retry can fix into one line naming the cause and the
/// fix; `None` for everything else (transient errors, a missing object, a failed condition).
/// `location` is the repository as shown to users, `object` the object's full name.
pub(crate) fn permanent_problem(
    location: &str,
    bucket: &str,
    object: &str,
    e: &object_store::Error,
) -> Option<Error> {
    use object_store::Error as E;
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        text.push_str(": ");
        text.push_str(&s.to_string());
        src = s.source();
    }
    let code = error_code(&text).unwrap_or_default().to_string();
    let remote = |kind, problem: String, fix: &str| {
        Some(Error::Remote {
            location: match kind {
                RemoteProblem::NoBucket | RemoteProblem::PlainHttp => location.to_string(),
                _ => object.to_string(),
            },
            kind,
            problem,
            fix: fix.to_string(),
        })
    };
    let check_keys = "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN \
                      for temporary credentials)";
    match (e, code.as_str()) {
        (_, "NoSuchBucket") => remote(
            RemoteProblem::NoBucket,
            format!("the bucket '{bucket}' does not exist (NoSuchBucket)"),
            "create it, or correct the bucket in --repo s3://BUCKET/PREFIX (and the endpoint \
             in --s3-endpoint)",
        ),
        (_, "InvalidAccessKeyId") => remote(
            RemoteProblem::Credentials,
            "the service does not know this access key (InvalidAccessKeyId)".into(),
            check_keys,
        ),
        (_, "SignatureDoesNotMatch") => remote(
            RemoteProblem::Credentials,
            "the request signature does not match: the secret key is wrong \
             (SignatureDoesNotMatch)"
                .into(),
            "check AWS_SECRET_ACCESS_KEY",
        ),
        (_, "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired") => remote(
            RemoteProblem::Credentials,
            format!("the session token was refused ({code})"),
            "renew the temporary credentials (AWS_SESSION_TOKEN) or use long-term ones",
        ),
        (_, "RequestTimeTooSkewed") => remote(
            RemoteProblem::Credentials,
            "the service refuses this machine's clock (RequestTimeTooSkewed)".into(),
            "set the system clock right (NTP)",
        ),
        (E::Unauthenticated { .. }, _) => remote(
            RemoteProblem::Credentials,
            format!(
                "the credentials were refused (HTTP 401{})",
                if code.is_empty() {
                    String::new()
                } else {
                    format!(" {code}")
                }
            ),
            check_keys,
        ),
        (E::PermissionDenied { .. }, _) => remote(
            RemoteProblem::AccessDenied,
            format!(
                "access denied (HTTP 403{})",
                if code.is_empty() {
                    String::new()
                } else {
                    format!(" {code}")
                }
            ),
            "allow these credentials s3:ListBucket on the bucket and s3:GetObject, \
             s3:PutObject and s3:DeleteObject on the prefix (bucket policy or IAM)",
        ),
        _ if text.contains("URL scheme is not allowed") => remote(
            RemoteProblem::PlainHttp,
            "the S3 endpoint is plain HTTP, which is refused unless allowed".into(),
            "use an https:// endpoint, or pass --s3-allow-http (or set AWS_ALLOW_HTTP=true) \
             for a service on a trusted network",
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bucket_and_prefix() {
        let l = S3Location::parse("s3://my-bucket/a/b/").unwrap();
        assert_eq!(l.bucket, "my-bucket");
        assert_eq!(l.prefix, "a/b");
        assert_eq!(l.display(), "s3://my-bucket/a/b");
        assert_eq!(S3Location::parse("s3://bkt").unwrap().prefix, "");
    }

    #[test]
    fn rejects_bad_locations_without_echoing_secrets() {
        let e = S3Location::parse("s3://AKIA:hunter2secret@bucket/p").unwrap_err();
        assert!(!e.to_string().contains("hunter2secret"), "{e}");
        for l in [
            "s3://bucket/p?access_key_id=AKIAX&secret_access_key=hunter2secret",
            "s3://bucket?secret=hunter2secret",
        ] {
            let e = S3Location::parse(l).unwrap_err().to_string();
            assert!(!e.contains("hunter2secret") && !e.contains("AKIAX"), "{e}");
            assert!(e.contains("s3://bucket/"), "{e}");
        }
        assert!(S3Location::parse("s3://").is_err());
        assert!(S3Location::parse("s3://Bad_Bucket/x").is_err());
        assert!(S3Location::parse("s3://b/../x").is_err());
    }

    #[test]
    fn an_endpoint_with_credentials_is_refused_without_echoing_them() {
        let loc = S3Location::parse("s3://bucket/p").unwrap();
        for ep in [
            "https://AKIAX:hunter2secret@s3.example.com:9000",
            "http://hunter2secret@127.0.0.1:9000/",
        ] {
            let opts = StoreOptions {
                s3_endpoint: Some(ep.into()),
                s3_allow_http: true,
                ..StoreOptions::default()
            };
            let e = open_s3(&loc, &opts).expect_err("refused").to_string();
            assert!(!e.contains("hunter2secret") && !e.contains("AKIAX"), "{e}");
            assert!(e.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
        }
        // An '@' in the path is no userinfo.
        assert_eq!(
            without_userinfo("https://host:9000/a@b"),
            "https://host:9000/a@b"
        );
        assert_eq!(
            without_userinfo("https://u:p@host:9000/a@b"),
            "https://host:9000/a@b"
        );
    }
}
