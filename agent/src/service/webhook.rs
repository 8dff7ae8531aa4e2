//! Webhooks: each event becomes one row of the state database per endpoint (so it survives a
//! restart), and a background task delivers due rows with an HMAC-SHA256 signature, retrying with
//! backoff. Nothing here is ever awaited by a backup: enqueueing is one local insert, and a dead
//! endpoint only delays its own deliveries.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::config::WebhookConfig;
use super::state::{Delivery, State};
use crate::error::{Error, Result};

/// The signature header: `sha256=` and the hex HMAC-SHA256 of the body under the secret.
pub const SIGNATURE_HEADER: &str = "X-Blockvault-Signature";
/// The event name header.
pub const EVENT_HEADER: &str = "X-Blockvault-Event";

/// Deliveries give up after this many attempts (about two days with the backoff below).
pub const MAX_ATTEMPTS: u32 = 40;

/// Due deliveries taken per endpoint in one round.
const BATCH_PER_ENDPOINT: usize = 32;

pub struct Endpoint {
    pub url: String,
    secret: zeroize::Zeroizing<Vec<u8>>,
    events: Vec<String>,
}

impl Endpoint {
    pub fn load(c: &WebhookConfig) -> Result<Self> {
        let mut secret = std::fs::read(&c.secret_file).map_err(|e| {
            Error::Config(format!(
                "webhook {}: secret_file {}: {e}",
                redacted(c.url.get_ref()),
                c.secret_file.display()
            ))
        })?;
        while matches!(secret.last(), Some(b'\n' | b'\r')) {
            secret.pop();
        }
        if secret.is_empty() {
            return Err(Error::Config(format!(
                "webhook {}: secret_file {} is empty",
                redacted(c.url.get_ref()),
                c.secret_file.display()
            )));
        }
        Ok(Self {
            url: c.url.get_ref().clone(),
            secret: zeroize::Zeroizing::new(secret),
            events: c.events.iter().map(|e| e.get_ref().clone()).collect(),
        })
    }

    fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == event)
    }
}

/// `scheme://host[:port]` of a webhook URL, for logs and errors: a URL's path, query and user
/// part often carry an access token.
pub fn redacted(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}", u.scheme()),
                None => format!("{}://{host}", u.scheme()),
            }
        }
        Err(_) => "(an unreadable URL)".into(),
    }
}

/// `sha256=<hex>` of `body` under `key`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The JSON body of every event.
#[derive(Serialize)]
pub struct Event<'a, T: Serialize> {
    pub event: &'a str,
    pub time: String,
    pub host: &'a str,
    #[serde(flatten)]
    pub data: T,
}

pub struct Webhooks {
    endpoints: Vec<Endpoint>,
    state: Arc<State>,
    host: String,
    wake: tokio::sync::Notify,
}

impl Webhooks {
    pub fn new(endpoints: Vec<Endpoint>, state: Arc<State>, host: String) -> Self {
        Self {
            endpoints,
            state,
            host,
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Queues `event` for every endpoint that wants it. Errors are logged, never returned: an alert
    /// that cannot be queued must not fail the backup it reports on.
    pub fn emit<T: Serialize>(&self, event: &str, data: T) {
        if self.endpoints.is_empty() {
            return;
        }
        let body = Event {
            event,
            time: super::state::ts(Utc::now()),
            host: &self.host,
            data,
        };
        let body = match serde_json::to_string(&body) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!("webhook {event}: cannot serialise: {e}");
                return;
            }
        };
        for ep in self.endpoints.iter().filter(|e| e.wants(event)) {
            if let Err(e) = self.state.enqueue(&ep.url, event, &body, Utc::now()) {
                tracing::error!(
                    "webhook {event} to {}: cannot queue: {e}",
                    redacted(&ep.url)
                );
            }
        }
        self.wake.notify_one();
    }

    /// Delivers queued events until `stop`.
    pub async fn deliver_loop(self: Arc<Self>, stop: CancellationToken) {
        if self.endpoints.is_empty() {
            return;
        }
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("webhooks disabled: cannot build an HTTP client: {e}");
                return;
            }
        };
        loop {
            let due = match self.state.due_deliveries(Utc::now(), BATCH_PER_ENDPOINT) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("webhooks: {e}");
                    vec![]
                }
            };
            // Endpoints are served side by side, each in its own order: one that does not
            // answer (10 s per attempt) holds back only its own deliveries. After a failure the
            // rest of that endpoint's batch waits for the next round.
            let mut by_endpoint: Vec<(&Endpoint, Vec<Delivery>)> = Vec::new();
            for d in due {
                let Some(ep) = self.endpoints.iter().find(|e| e.url == d.url) else {
                    // The endpoint left the configuration: its queue goes with it.
                    let _ = self.state.delivered(d.id);
                    continue;
                };
                match by_endpoint.iter_mut().find(|(e, _)| e.url == ep.url) {
                    Some((_, rows)) => rows.push(d),
                    None => by_endpoint.push((ep, vec![d])),
                }
            }
            let rounds = by_endpoint.into_iter().map(|(ep, rows)| {
                let (this, client) = (&self, &client);
                async move {
                    for d in rows {
                        if !this.deliver(client, ep, d).await {
                            break;
                        }
                    }
                }
            });
            futures::future::join_all(rounds).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

impl Webhooks {
    /// One delivery attempt; true when the endpoint took it (or it was given up on).
    async fn deliver(&self, client: &reqwest::Client, ep: &Endpoint, d: Delivery) -> bool {
        let r = client
            .post(&d.url)
            .header("Content-Type", "application/json")
            .header(EVENT_HEADER, &d.event)
            .header(SIGNATURE_HEADER, sign(&ep.secret, d.body.as_bytes()))
            .body(d.body.clone())
            .send()
            .await;
        let failure = match r {
            Ok(resp) if resp.status().is_success() => None,
            Ok(resp) => Some(format!("HTTP {}", resp.status())),
            // Without the URL, which may carry a token; never the body or the secret either.
            Err(e) => Some(e.without_url().to_string()),
        };
        match failure {
            None => {
                let _ = self.state.delivered(d.id);
                true
            }
            Some(err) if d.attempts + 1 >= MAX_ATTEMPTS => {
                tracing::error!(
                    "webhook {} to {}: giving up after {} attempts: {err}",
                    d.event,
                    redacted(&d.url),
                    d.attempts + 1
                );
                let _ = self.state.delivered(d.id);
                false
            }
            Some(err) => {
                // 1 s, 2 s, 4 s ... capped at one hour.
                let wait =
                    Duration::from_secs(1u64 << d.attempts.min(12)).min(Duration::from_secs(3600));
                tracing::warn!(
                    "webhook {} to {}: {err}; retrying in {}s",
                    d.event,
                    redacted(&d.url),
                    wait.as_secs()
                );
                let next = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                let _ = self.state.delivery_failed(d.id, next, &err);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_logs_keep_only_scheme_host_and_port() {
        assert_eq!(
            redacted("https://user:pw@hooks.example.net/T0/B1/tok3n?key=s3cret#x"),
            "https://hooks.example.net"
        );
        assert_eq!(
            redacted("http://127.0.0.1:8080/hook?token=abc"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(redacted("http://[::1]:9/a"), "http://[::1]:9");
        assert_eq!(redacted("not a url /secret"), "(an unreadable URL)");
    }

    /// A failed attempt's error (logged, and kept in the queue) does not carry the URL.
    #[tokio::test]
    async fn a_failed_delivery_records_no_url() {
        let d = tempfile::tempdir().unwrap();
        let state = Arc::new(State::open(&d.path().join("s.db")).unwrap());
        // A port nobody listens on: the connection is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/hook?token=tok-Zq81");
        let ep = Endpoint {
            url: url.clone(),
            secret: zeroize::Zeroizing::new(b"k".to_vec()),
            events: vec![],
        };
        let hooks = Webhooks::new(vec![], state.clone(), "h".into());
        state
            .enqueue(&url, "run.started", "{}", Utc::now())
            .unwrap();
        let due = state.due_deliveries(Utc::now(), 1).unwrap();
        let client = reqwest::Client::new();
        assert!(!hooks.deliver(&client, &ep, due[0].clone()).await);
        let err = state.delivery_error(due[0].id).unwrap().unwrap();
        assert!(!err.is_empty() && !err.contains("tok-Zq81"), "{err}");
    }

    #[test]
    fn signature_matches_rfc4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
