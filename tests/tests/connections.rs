//! Connection-level behaviour: counting per request on keep-alive and pipelined connections,
//! and slow senders that must not starve Stripe's deliveries.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{client_from, ignored_event, post_signed, Stack, StackOptions};

/// Opens a blocking connection from `source` (any 127.x.y.z address) to `to`.
fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

/// Reads `count` HTTP/1.1 responses with `Content-Length` bodies and returns their statuses.
fn read_statuses(stream: &mut TcpStream, count: usize) -> Vec<u16> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buffer = Vec::new();
    let mut statuses = Vec::new();
    let mut chunk = [0u8; 8192];
    while statuses.len() < count {
        let read = stream.read(&mut chunk).unwrap();
        assert!(
            read > 0,
            "connection closed after {} responses",
            statuses.len()
        );
        buffer.extend_from_slice(&chunk[..read]);
        while let Some(end) = find(&buffer, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() < end + 4 + length {
                break;
            }
            statuses.push(head[9..12].parse().unwrap());
            buffer.drain(..end + 4 + length);
        }
    }
    statuses
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

const GENERATE: &str =
    "POST /api/v1/generate HTTP/1.1\r\nHost: tollgate\r\nContent-Length: 2\r\n\r\n{}";

#[tokio::test]
async fn keep_alive_and_pipelined_requests_are_counted_one_by_one() {
    let stack = Stack::start(StackOptions::default()).await;
    let gateway = stack.gateway;
    let (sequential, pipelined) = tokio::task::spawn_blocking(move || {
        let mut one = connect_from([127, 0, 80, 1], gateway);
        let mut sequential = Vec::new();
        for _ in 0..10 {
            one.write_all(GENERATE.as_bytes()).unwrap();
            sequential.extend(read_statuses(&mut one, 1));
        }
        let mut two = connect_from([127, 0, 80, 2], gateway);
        two.write_all(GENERATE.repeat(10).as_bytes()).unwrap();
        (sequential, read_statuses(&mut two, 10))
    })
    .await
    .unwrap();
    let expected = [200, 200, 200, 429, 429, 429, 429, 429, 429, 429];
    assert_eq!(sequential, expected);
    assert_eq!(pipelined, expected);
    assert_eq!(stack.upstream.count("/api/v1/generate"), 6);
}

#[tokio::test]
async fn slow_senders_do_not_starve_stripe() {
    let stack = Stack::start(StackOptions::default()).await;
    let gateway = stack.gateway;
    let slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut stream = connect_from([127, 0, 81, 66], gateway);
            let head =
                "POST /api/v1/stripe/webhook HTTP/1.1\r\nHost: t\r\nContent-Length: 305\r\n\r\nx";
            stream.write_all(head.as_bytes()).unwrap();
            stream
        })
        .collect();

    let event = ignored_event("evt_during_slowloris");
    let started = Instant::now();
    let response = post_signed(
        &client_from([127, 0, 81, 7]),
        &stack,
        "/api/v1/stripe/webhook",
        event,
    )
    .await;
    assert!(response.status().is_success(), "{}", response.status());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    drop(slow);
}

#[tokio::test]
async fn a_webhook_of_exactly_one_mebibyte_is_forwarded() {
    let stack = Stack::start(StackOptions::default()).await;
    let mut event = serde_json::to_vec(&serde_json::json!({
        "id": "evt_exact_mebibyte", "object": "event", "type": "customer.created",
        "data": {"object": {"padding": ""}},
    }))
    .unwrap();
    // Grow the padding string until the body is exactly 1,048,576 bytes.
    let missing = 1_048_576 - event.len();
    let at = find(&event, b"\"padding\":\"").unwrap() + "\"padding\":\"".len();
    event.splice(at..at, std::iter::repeat_n(b'p', missing));
    assert_eq!(event.len(), 1_048_576);
    let response = post_signed(
        &client_from([127, 0, 82, 1]),
        &stack,
        "/api/v1/stripe/webhook",
        event,
    )
    .await;
    assert_eq!(response.status(), 200);
}
