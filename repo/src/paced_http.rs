//! The HTTP client under the S3 store: request bodies paced as they are sent, and timeouts that
//! measure progress instead of a whole-request deadline.
//!
//! - **Pacing.** With an upload limit, a body is handed to the connection in small pieces, each
//!   after its share of the limit (one token bucket for all requests), so a pack leaves at the
//!   limited rate instead of waiting and then bursting at line rate.
//! - **Progress timeouts.** A fixed whole-request deadline would kill any upload slower than the
//!   deadline's naive reading (a 16 MiB pack over a 1 Mbit/s link takes over two minutes). A
//!   request is abandoned instead when it stops making progress for `idle`: no body bytes taken
//!   by the connection for that long (time spent waiting for our own pacing does not count), no
//!   response head within that long after the last body byte, or no response body bytes for that
//!   long. The connection's send buffer (a few seconds of a slow link at most) is the only slack.
//!   Connecting has its own timeout.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::{ClientConfigKey, ClientOptions};
use tokio::time::{Instant, Sleep};

use crate::throttle::TokenBucket;

/// Builds [`PacedService`] clients for object_store's S3 store.
#[derive(Debug, Clone)]
pub(crate) struct PacedConnector {
    pub upload: Option<Arc<TokenBucket>>,
    pub idle: Duration,
    /// Connect timeout when the client options name none.
    pub connect: Duration,
}

impl HttpConnector for PacedConnector {
    /// Plain HTTP and the connect timeout follow the options of each client: object_store asks
    /// for one client per purpose, and the credential clients differ from the store's (the
    /// instance and container metadata services are plain HTTP on a link-local address, with a
    /// short connect timeout; the web-identity token service is HTTPS only).
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let allow_http = options
            .get_config_value(&ClientConfigKey::AllowHttp)
            .is_some_and(|v| crate::s3::truthy(&v));
        let connect = options
            .get_config_value(&ClientConfigKey::ConnectTimeout)
            .and_then(|v| parse_duration(&v))
            .unwrap_or(self.connect);
        let client = reqwest::Client::builder()
            .https_only(!allow_http)
            .connect_timeout(connect)
            // S3 speaks HTTP/1.1; services close idle connections after about 20 s.
            .http1_only()
            .pool_idle_timeout(Duration::from_secs(15))
            .user_agent(concat!("blockvault/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            })?;
        Ok(HttpClient::new(PacedService {
            client,
            upload: self.upload.clone(),
            idle: self.idle,
        }))
    }
}

/// A duration as object_store shows its settings (`10s`, `1s 500ms`, `2m`); `None` for any other
/// form.
fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for part in text.split_whitespace() {
        let digits = part.find(|c: char| !c.is_ascii_digit())?;
        let n: u64 = part[..digits].parse().ok()?;
        total += match &part[digits..] {
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            "m" | "min" => Duration::from_secs(n.checked_mul(60)?),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "us" => Duration::from_micros(n),
            "ns" => Duration::from_nanos(n),
            _ => return None,
        };
    }
    (total > Duration::ZERO).then_some(total)
}

#[derive(Debug)]
struct PacedService {
    client: reqwest::Client,
    upload: Option<Arc<TokenBucket>>,
    idle: Duration,
}

/// When the request last made progress, and whether it is waiting for its pacing share now.
#[derive(Debug)]
struct Progress {
    last: Mutex<Instant>,
    pacing: AtomicBool,
}

impl Progress {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn stalled_for(&self) -> Duration {
        if self.pacing.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

fn timeout_error(what: String) -> HttpError {
    HttpError::new(
        HttpErrorKind::Timeout,
        std::io::Error::new(std::io::ErrorKind::TimedOut, what),
    )
}

/// Size of the pieces a paced body is handed over in: about 1/16 s of the rate, so pacing is
/// smooth, within 16 KiB .. 256 KiB so slow links still see whole segments and fast ones few
/// wake-ups.
fn piece_size(bucket: Option<&TokenBucket>) -> usize {
    match bucket {
        Some(b) => ((b.rate() / 16.0) as usize).clamp(16 << 10, 256 << 10),
        None => 256 << 10,
    }
}

#[async_trait]
impl HttpService for PacedService {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let (parts, mut body) = req.into_parts();
        let url: reqwest::Url = parts
            .uri
            .to_string()
            .parse()
            .map_err(|e| HttpError::new(HttpErrorKind::Unknown, e))?;
        let create_only = parts.method == http::Method::PUT
            && parts.headers.contains_key(http::header::IF_NONE_MATCH);
        let mut request = reqwest::Request::new(parts.method, url);
        *request.headers_mut() = parts.headers;
        set_content_length(request.headers_mut(), body.content_length() as u64);
        let progress = Arc::new(Progress {
            last: Mutex::new(Instant::now()),
            pacing: AtomicBool::new(false),
        });
        // Not `is_empty()`: object_store 0.12 answers it backwards for multi-part payloads.
        if body.content_length() > 0 {
            let mut frames = Vec::new();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    frames.push(data);
                }
            }
            let piece = piece_size(self.upload.as_deref());
            let pieces: Vec<Bytes> = frames
                .into_iter()
                .flat_map(|f| {
                    (0..f.len())
                        .step_by(piece)
                        .map(move |at| f.slice(at..(at + piece).min(f.len())))
                        .collect::<Vec<_>>()
                })
                .collect();
            let (bucket, p) = (self.upload.clone(), progress.clone());
            let stream = futures::stream::iter(pieces).then(move |piece| {
                let (bucket, p) = (bucket.clone(), p.clone());
                async move {
                    if let Some(b) = bucket {
                        p.pacing.store(true, Ordering::Relaxed);
                        b.take(piece.len() as u64).await;
                        p.pacing.store(false, Ordering::Relaxed);
                    }
                    p.touch();
                    Ok::<_, std::io::Error>(piece)
                }
            });
            *request.body_mut() = Some(reqwest::Body::wrap_stream(stream));
        }
        let idle = self.idle;
        let watchdog = {
            let p = progress.clone();
            async move {
                loop {
                    let stalled = p.stalled_for();
                    if stalled >= idle {
                        return;
                    }
                    tokio::time::sleep((idle - stalled).max(Duration::from_millis(50))).await;
                }
            }
        };
        let response = tokio::select! {
            r = self.client.execute(request) => r.map_err(reqwest_error)?,
            () = watchdog => {
                return Err(timeout_error(format!(
                    "no progress for {idle:?} (request timeout; sending the body or waiting for \
                     the answer)"
                )))
            }
        };
        if create_only && response.status() == http::StatusCode::NOT_IMPLEMENTED {
            return Err(conditional_put_unsupported());
        }
        let response: http::Response<reqwest::Body> = response.into();
        let (parts, body) = response.into_parts();
        let body = IdleBody {
            inner: body,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        };
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// Gives a request with a body its length when it has none. The body is streamed below, which
/// without the header goes out with `Transfer-Encoding: chunked`, and S3 refuses that (501 Not
/// Implemented). object_store sets the header on PUTs only, not on the POST of a bulk delete.
fn set_content_length(headers: &mut http::HeaderMap, len: u64) {
    if len > 0 && !headers.contains_key(http::header::CONTENT_LENGTH) {
        headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    }
}

/// A service without conditional writes answers a create-only put (`If-None-Match: *`) with 501
/// Not Implemented. object_store retries every 5xx for minutes; as an error of kind `Unknown` it
/// is returned at once, and its `Unsupported` source tells the repository to fall back to
/// check-then-put (`storage::conditional_put_unsupported`).
fn conditional_put_unsupported() -> HttpError {
    HttpError::new(
        HttpErrorKind::Unknown,
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "the service does not implement create-only writes (If-None-Match: HTTP 501)",
        ),
    )
}

/// Classifies a client error the way object_store's retry logic expects.
fn reqwest_error(e: reqwest::Error) -> HttpError {
    let kind = if e.is_timeout() {
        HttpErrorKind::Timeout
    } else if e.is_connect() {
        HttpErrorKind::Connect
    } else if e.is_builder() {
        HttpErrorKind::Unknown
    } else if e.is_body() || e.is_request() {
        // The connection broke while the request was sent (reset, closed): safe to send again.
        HttpErrorKind::Request
    } else if e.is_decode() {
        HttpErrorKind::Decode
    } else {
        HttpErrorKind::Unknown
    };
    HttpError::new(kind, e.without_url())
}

/// A response body that fails when no bytes arrive for `idle`.
struct IdleBody {
    inner: reqwest::Body,
    idle: Duration,
    timer: Pin<Box<Sleep>>,
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                let deadline = Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(r.map(|f| f.map_err(reqwest_error)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(timeout_error(format!(
                    "no response data for {:?} (request timeout)",
                    this.idle
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::client::HttpRequestBody;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn client(idle: Duration) -> HttpClient {
        PacedConnector {
            upload: None,
            idle,
            connect: Duration::from_secs(2),
        }
        .connect(&ClientOptions::new().with_allow_http(true))
        .unwrap()
    }

    /// A server on 127.0.0.1 that reads each request head and then does `then` with the
    /// connection.
    async fn server<F, Fut>(then: F) -> u16
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let then = Arc::new(then);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let then = then.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if s.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(b[0]);
                    }
                    then(s).await;
                });
            }
        });
        port
    }

    fn get(port: u16) -> HttpRequest {
        http::Request::builder()
            .method("GET")
            .uri(format!("http://127.0.0.1:{port}/x"))
            .body(HttpRequestBody::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_without_an_answer_times_out_after_the_idle_time() {
        let port = server(|s| async move {
            let _hold = s;
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let t = std::time::Instant::now();
        let e = client(Duration::from_millis(400))
            .execute(get(port))
            .await
            .unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind(), HttpErrorKind::Timeout, "{e}");
        assert!(e.to_string().contains("no progress"), "{e}");
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_times_out_but_a_slow_one_does_not() {
        // 10 pieces 100 ms apart (1 s in all, longer than the idle time), then a stall.
        let port = server(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                .await;
            for _ in 0..10 {
                let _ = s.write_all(&[7u8; 5]).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let r = client(Duration::from_millis(400))
            .execute(get(port))
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let mut got = 0;
        let mut stream = r.into_body().bytes_stream();
        let err = loop {
            match stream.next().await {
                Some(Ok(b)) => got += b.len(),
                Some(Err(e)) => break e,
                None => panic!("the body ended"),
            }
        };
        assert_eq!(got, 50, "the slow part was read whole");
        assert_eq!(err.kind(), HttpErrorKind::Timeout, "{err}");
        assert!(
            t.elapsed() >= Duration::from_millis(1200),
            "{:?}",
            t.elapsed()
        );
    }

    /// The instance metadata credentials are fetched over plain HTTP through this connector,
    /// with options that allow it; the store's own client refuses it unless allowed.
    #[tokio::test]
    async fn plain_http_follows_the_options_of_each_client() {
        let port = server(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await;
        })
        .await;
        let connector = PacedConnector {
            upload: None,
            idle: Duration::from_secs(5),
            connect: Duration::from_secs(2),
        };
        let metadata = connector
            .connect(&ClientOptions::new().with_allow_http(true))
            .unwrap();
        let r = metadata.execute(get(port)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.into_body().bytes().await.unwrap(), &b"ok"[..]);
        let store = connector.connect(&ClientOptions::new()).unwrap();
        let e = store.execute(get(port)).await.unwrap_err();
        let mut text = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            text = format!("{text}: {s}");
            src = s.source();
        }
        assert!(text.contains("URL scheme is not allowed"), "{text}");
    }

    /// A POST with a body but no Content-Length from object_store (a bulk delete) goes out
    /// with its length, not chunked.
    #[tokio::test]
    async fn a_body_without_a_length_header_is_sent_with_its_length() {
        let (heads, mut got) = tokio::sync::mpsc::unbounded_channel::<String>();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).await.unwrap() == 1 {
                head.push(b[0]);
            }
            heads
                .send(String::from_utf8_lossy(&head).to_lowercase())
                .unwrap();
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
        });
        let body = bytes::Bytes::from_static(b"<Delete><Object><Key>a</Key></Object></Delete>");
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://127.0.0.1:{port}/bucket?delete"))
            .body(HttpRequestBody::from(body.clone()))
            .unwrap();
        let r = client(Duration::from_secs(5)).execute(req).await.unwrap();
        assert_eq!(r.status(), 200);
        let head = got.recv().await.unwrap();
        server.await.unwrap();
        assert!(
            head.contains(&format!("content-length: {}\r\n", body.len())),
            "{head}"
        );
        assert!(!head.contains("transfer-encoding"), "{head}");
    }

    /// A 501 to a create-only put comes back at once as unsupported; to other requests it stays
    /// an answer (object_store's retries judge it).
    #[tokio::test]
    async fn a_create_only_put_refused_as_not_implemented_is_unsupported() {
        let port = server(|mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n")
                .await;
        })
        .await;
        let put = |conditional: bool| {
            let mut b = http::Request::builder()
                .method("PUT")
                .uri(format!("http://127.0.0.1:{port}/b/x"));
            if conditional {
                b = b.header("If-None-Match", "*");
            }
            b.body(HttpRequestBody::empty()).unwrap()
        };
        let c = client(Duration::from_secs(5));
        let e = c.execute(put(true)).await.unwrap_err();
        assert_eq!(e.kind(), HttpErrorKind::Unknown, "{e}");
        let io = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .expect("an I/O error source");
        assert_eq!(io.kind(), std::io::ErrorKind::Unsupported);
        assert_eq!(c.execute(put(false)).await.unwrap().status(), 501);
    }

    #[test]
    fn durations_read_as_object_store_shows_them() {
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_duration("1s 500ms"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("soon"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn pieces_follow_the_rate() {
        assert_eq!(piece_size(None), 256 << 10);
        assert_eq!(piece_size(Some(&TokenBucket::new(1000))), 16 << 10);
        assert_eq!(piece_size(Some(&TokenBucket::new(1 << 20))), 64 << 10);
        assert_eq!(piece_size(Some(&TokenBucket::new(1 << 30))), 256 << 10);
    }
}
