//! The exchange with the upstream over real sockets: what the app receives, how bodies and
//! framing pass through, and how pooled connections are reused and replaced.
//!
//! The upstream here is a raw TCP server, so that each test sees the request bytes exactly as
//! the gateway wrote them and can misbehave the way real apps do (close an idle connection,
//! answer without a length).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{shipped_config_with, Stack, StackOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the raw upstream does after answering a request.
#[derive(Clone, Copy, PartialEq)]
enum Manner {
    /// Answers with a length and keeps the connection for the next request.
    KeepAlive,
    /// Answers with a length, then closes the connection without saying so: the way an app
    /// drops an idle keep-alive connection.
    CloseSilently,
    /// Answers without a length and ends the body by closing, as HTTP/1.0 servers do.
    CloseDelimited,
    /// Answers with a reason phrase and fields of its own choosing, and keeps the connection.
    OwnWords,
    /// Answers 413 as soon as it has the head, and closes without reading the body.
    RefuseEarly,
    /// Answers the first request of a connection; reads the next, then closes without
    /// answering, the way an app dies or restarts between two requests.
    Vanish,
    /// Answers with fields that concern its own connection and a body without a length.
    HopByHop,
}

/// A raw HTTP/1.1 upstream that records every request head and body it reads.
struct RawUpstream {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(manner: Manner) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let connections: Arc<AtomicUsize> = Arc::default();
        let (seen, accepted) = (requests.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_connection(stream, manner, seen.clone()));
            }
        });
        Self {
            address,
            requests,
            connections,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_connection(
    mut stream: tokio::net::TcpStream,
    manner: Manner,
    seen: Arc<Mutex<Vec<String>>>,
) {
    let mut buffer = Vec::new();
    if manner == Manner::RefuseEarly {
        while find(&buffer, b"\r\n\r\n").is_none() {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
        let head_end = find(&buffer, b"\r\n\r\n").unwrap() + 4;
        seen.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&buffer[..head_end]).into_owned());
        let answer = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 7\r\n\r\ntoo big";
        let _ = stream.write_all(answer).await;
        return;
    }
    let mut served = 0;
    while let Some(request) = read_request(&mut stream, &mut buffer).await {
        seen.lock().unwrap().push(request);
        served += 1;
        let answer: &[u8] = match manner {
            Manner::CloseDelimited => b"HTTP/1.1 200 OK\r\n\r\nstreamed until close",
            Manner::Vanish if served > 1 => return,
            Manner::HopByHop => {
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: leaked\r\n\
                  Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-Foo\r\n\
                  X-Kept: yes\r\n\r\nstreamed until close"
            }
            Manner::OwnWords => {
                b"HTTP/1.1 203 Rewritten By The App\r\nX-App-Note: first\r\n\
                  X-App-Note: second\r\nContent-Length: 2\r\n\r\nok"
            }
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        };
        let keeps = matches!(
            manner,
            Manner::KeepAlive | Manner::OwnWords | Manner::Vanish
        );
        if stream.write_all(answer).await.is_err() || !keeps {
            return;
        }
    }
}

/// Reads one request (head, and a body framed by length or chunks) as text.
async fn read_request(stream: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
    let complete = |buffer: &[u8]| -> Option<usize> {
        let head_end = find(buffer, b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        if head.contains("transfer-encoding: chunked") {
            return find(&buffer[head_end..], b"0\r\n\r\n").map(|end| head_end + end + 5);
        }
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .map_or(0, |value| value.trim().parse().unwrap());
        (buffer.len() >= head_end + length).then_some(head_end + length)
    };
    loop {
        if let Some(end) = complete(buffer) {
            let request = String::from_utf8_lossy(&buffer[..end]).into_owned();
            buffer.drain(..end);
            return Some(request);
        }
        let mut chunk = [0u8; 4096];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// A gateway on the shipped configuration with `/raw/` routed to `upstream`.
async fn stack_before(upstream: &RawUpstream) -> Stack {
    let extra = format!(
        "[upstreams.raw]\naddress = \"{}\"\n\n[[routes]]\nname = \"raw\"\n\
         path_prefix = \"/raw/\"\nupstream = \"raw\"\n",
        upstream.address
    );
    Stack::start(StackOptions {
        gateway_config: Some(shipped_config_with(&extra)),
        ..StackOptions::default()
    })
    .await
}

/// A client connection to the gateway whose reads give up after 5 s.
fn connect(gateway: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(gateway).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// Sends `request` on a new connection and reads until the gateway closes it or `wanted`
/// appears.
fn exchange(gateway: SocketAddr, request: &[u8], wanted: &str) -> String {
    let mut stream = connect(gateway);
    stream.write_all(request).unwrap();
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&received).contains(wanted) {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(read) => received.extend_from_slice(&chunk[..read]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// [`exchange`] off the runtime's threads, reading until the raw upstream's `ok` arrives.
async fn exchange_ok(stack: &Stack, request: &'static str) -> String {
    let gateway = stack.gateway;
    tokio::task::spawn_blocking(move || exchange(gateway, request.as_bytes(), "\r\n\r\nok"))
        .await
        .unwrap()
}

#[tokio::test]
async fn hop_by_hop_fields_stop_at_the_gateway_and_cannot_remove_the_forwarded_address() {
    let upstream = RawUpstream::start(Manner::KeepAlive).await;
    let stack = stack_before(&upstream).await;
    let request = "GET /raw/hop HTTP/1.1\r\nHost: t\r\n\
                   Connection: keep-alive, X-Forwarded-For, X-Internal-Hint\r\n\
                   Keep-Alive: timeout=5\r\nX-Internal-Hint: secret\r\nTE: trailers\r\n\
                   Upgrade: websocket\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
                   X-Forwarded-For: 203.0.113.9\r\nX-Kept: yes\r\n\r\n";
    let answer = exchange_ok(&stack, request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    let head = seen[0].to_ascii_lowercase();
    for gone in [
        "connection: keep-alive,",
        "keep-alive: timeout",
        "x-internal-hint",
        "te: trailers",
        "upgrade:",
        "proxy-authorization",
        "203.0.113.9",
    ] {
        assert!(!head.contains(gone), "{gone} reached the app:\n{head}");
    }
    assert!(head.starts_with("get /raw/hop http/1.1\r\n"), "{head}");
    assert_eq!(
        head.matches("x-forwarded-for: 127.0.0.1\r\n").count(),
        1,
        "{head}"
    );
    assert!(head.contains("x-kept: yes"), "{head}");
}

#[tokio::test]
async fn a_chunked_body_reaches_the_app_whole_and_still_chunked() {
    let upstream = RawUpstream::start(Manner::KeepAlive).await;
    let stack = stack_before(&upstream).await;
    let request = "POST /raw/upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
                   5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
    let answer = exchange_ok(&stack, request).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let seen = upstream.requests();
    let request = seen[0].to_ascii_lowercase();
    let (head, body) = request.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    let decoded: String = body
        .split("\r\n")
        .collect::<Vec<_>>()
        .chunks(2)
        .filter_map(|pair| pair.get(1).copied())
        .collect();
    assert_eq!(decoded, "hello, world");
}

#[tokio::test]
async fn a_client_waiting_for_100_continue_gets_it_from_the_gateway() {
    let upstream = RawUpstream::start(Manner::KeepAlive).await;
    let stack = stack_before(&upstream).await;
    let gateway = stack.gateway;
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = connect(gateway);
        let head = "POST /raw/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\
                    Expect: 100-continue\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        let mut interim = [0u8; 25];
        stream.read_exact(&mut interim).unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(b"data").unwrap();
        let mut rest = Vec::new();
        let mut chunk = [0u8; 1024];
        while !String::from_utf8_lossy(&rest).contains("\r\n\r\nok") {
            let read = stream.read(&mut chunk).unwrap();
            assert!(read > 0, "closed early: {}", String::from_utf8_lossy(&rest));
            rest.extend_from_slice(&chunk[..read]);
        }
        String::from_utf8_lossy(&rest).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The interim answer does not cost the client its connection.
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("connection: keep-alive"),
        "{answer}"
    );
    let seen = upstream.requests();
    assert!(seen[0].ends_with("\r\n\r\ndata"), "{:?}", seen[0]);
    assert!(
        !seen[0].to_ascii_lowercase().contains("expect:"),
        "{:?}",
        seen[0]
    );
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let upstream = RawUpstream::start(Manner::KeepAlive).await;
    let stack = stack_before(&upstream).await;
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let response = client.get(stack.url("/raw/again")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "ok");
    }
    assert_eq!(upstream.requests().len(), 20);
    // One connection per worker thread at most (the shipped file runs two).
    assert!(upstream.connections() <= 2, "{}", upstream.connections());
}

#[tokio::test]
async fn a_pooled_connection_the_app_closed_is_replaced_not_failed() {
    let upstream = RawUpstream::start(Manner::CloseSilently).await;
    let stack = stack_before(&upstream).await;
    let client = reqwest::Client::new();
    for round in 0..10 {
        let response = client.get(stack.url("/raw/flaky")).send().await.unwrap();
        assert_eq!(response.status(), 200, "round {round}");
        assert_eq!(response.text().await.unwrap(), "ok");
        // Give the close time to arrive, as it would while a connection idles.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.requests().len(), 10);
    assert_eq!(upstream.connections(), 10);
}

#[tokio::test]
async fn a_body_ended_by_close_reaches_the_client_chunked_on_a_kept_connection() {
    let upstream = RawUpstream::start(Manner::CloseDelimited).await;
    let stack = stack_before(&upstream).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let response = client.get(stack.url("/raw/old")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let chunked = response
            .headers()
            .get("transfer-encoding")
            .is_some_and(|value| value == "chunked");
        assert!(chunked, "{:?}", response.headers());
        assert_eq!(response.text().await.unwrap(), "streamed until close");
    }
    assert_eq!(upstream.connections(), 3);
}

#[tokio::test]
async fn the_apps_reason_phrase_and_repeated_fields_reach_the_client_unchanged() {
    let upstream = RawUpstream::start(Manner::OwnWords).await;
    let stack = stack_before(&upstream).await;
    let request = "GET /raw/words HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let answer = exchange_ok(&stack, request).await;
    assert!(
        answer.starts_with("HTTP/1.1 203 Rewritten By The App\r\n"),
        "{answer}"
    );
    let lower = answer.to_ascii_lowercase();
    let first = lower.find("x-app-note: first\r\n");
    let second = lower.find("x-app-note: second\r\n");
    assert!(first.is_some() && second.is_some(), "{answer}");
    assert!(first < second, "repeated fields keep their order: {answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
}

#[tokio::test]
async fn an_app_that_refuses_a_body_before_reading_it_is_heard() {
    let upstream = RawUpstream::start(Manner::RefuseEarly).await;
    let stack = stack_before(&upstream).await;
    let gateway = stack.gateway;
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = connect(gateway);
        let head = "POST /raw/upload HTTP/1.1\r\nHost: t\r\nContent-Length: 600000\r\n\r\n";
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&[b'x'; 1000]).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // The gateway may close before the rest is taken; the answer is what matters.
        let _ = stream.write_all(&[b'x'; 599_000]);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.ends_with("too big"), "{answer}");
}

#[tokio::test]
async fn only_a_request_that_is_safe_to_repeat_is_sent_again_after_a_dropped_connection() {
    let upstream = RawUpstream::start(Manner::Vanish).await;
    let stack = stack_before(&upstream).await;
    let client = reqwest::Client::new();
    // Each first request pools a connection that the app will drop on the next one.
    let warm = || async {
        client
            .get(stack.url("/raw/warm"))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(warm().await, 200);
    let post = client.post(stack.url("/raw/act")).send().await.unwrap();
    assert_eq!(post.status(), 502);
    let closing = post
        .headers()
        .get("connection")
        .is_some_and(|value| value == "close");
    assert!(closing, "a broken exchange closes: {:?}", post.headers());

    assert_eq!(warm().await, 200);
    let get = client.get(stack.url("/raw/read")).send().await.unwrap();
    assert_eq!(get.status(), 200);

    let seen = upstream.requests();
    let count = |line: &str| seen.iter().filter(|head| head.starts_with(line)).count();
    assert_eq!(count("POST /raw/act "), 1, "{seen:?}");
    assert_eq!(count("GET /raw/read "), 2, "{seen:?}");
}

#[tokio::test]
async fn the_apps_connection_fields_stop_at_the_gateway_and_http_1_0_gets_no_chunks() {
    let upstream = RawUpstream::start(Manner::HopByHop).await;
    let stack = stack_before(&upstream).await;
    let request = "GET /raw/fields HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let answer = exchange_until_closed(&stack, request).await;
    let lower = answer.to_ascii_lowercase();
    assert!(lower.contains("x-kept: yes"), "{answer}");
    for gone in ["x-secret", "proxy-connection", "\r\nte:", "\r\ntrailer:"] {
        assert!(
            !lower.contains(gone),
            "{gone} reached the client:\n{answer}"
        );
    }

    let old = "GET /raw/old HTTP/1.0\r\n\r\n";
    let answer = exchange_until_closed(&stack, old).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body, "streamed until close");
}

/// Sends `request` and reads until the gateway closes the connection.
async fn exchange_until_closed(stack: &Stack, request: &'static str) -> String {
    let gateway = stack.gateway;
    tokio::task::spawn_blocking(move || exchange(gateway, request.as_bytes(), "\u{0}"))
        .await
        .unwrap()
}
