//! The upstream half of a proxied request: the request head as the upstream sees it, the body
//! streamed to it, and its response streamed back.
//!
//! An exchange is sequential: the request and its body go first, then the response comes
//! back. Bodies stream chunk by chunk in both directions and are never buffered whole or
//! re-encoded; only the framing of a chunked body is rewritten by Pingora's codec. Hop-by-hop
//! fields (RFC 9110 section 7.6.1) end at the gateway in both directions. Protocol upgrades
//! are not proxied: the upstream never sees `Upgrade` and answers as to a plain request.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{request, response, Version};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::upstream::{self, upstream_error, Connection};

/// What bounds the request body on its way upstream.
pub struct BodyRules {
    /// Largest body the route accepts, in bytes; beyond it the exchange fails with 413.
    pub max_bytes: u64,
    /// When the whole body must have arrived; after it the exchange fails with 408.
    pub deadline: Instant,
}

/// Fields that concern one connection only and are never passed on, in either direction
/// (RFC 9110 section 7.6.1, plus the non-standard `Proxy-Connection`). `Transfer-Encoding`
/// is kept, since the other side needs the framing.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Fields a client could otherwise get removed by naming them in `Connection`: the gateway
/// writes or relies on these, so a nomination of them is ignored.
const PROTECTED: [HeaderName; 4] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("x-forwarded-for"),
];

/// Sends the request upstream and relays the answer. `request` builds the head the upstream
/// receives (it is called again if a pooled connection turns out to be closed and the
/// request has no body to replay); `respond` edits the response head before the client sees
/// it. Errors carry their side: downstream errors are the client's, the rest the upstream's.
///
/// Heads are edited as plain `http` parts and written without Pingora's map of original
/// name case: each field edit is then one map operation with a ready name, instead of a
/// name parsed and stored twice. Names therefore leave the gateway in lower case (a few
/// common ones title-cased), which HTTP/1.1 allows (RFC 9110 section 5.1).
pub async fn forward(
    session: &mut ServerSession,
    upstream: SocketAddr,
    body: &BodyRules,
    request: impl Fn(&ServerSession) -> Result<Box<RequestHeader>>,
    respond: impl FnOnce(&mut response::Parts) -> Result<()>,
) -> Result<()> {
    // Only a request that repeating cannot harm is sent twice (RFC 9110 section 9.2.2): a
    // POST the app may have acted on before its connection dropped is not.
    let replayable = session.is_body_empty() && idempotent(&session.req_header().method);
    let mut connection = upstream::connect(upstream).await.map_err(upstream_error)?;
    let mut answered = send(session, &mut connection, body, request(session)?).await;
    let upstreams_fault =
        matches!(&answered, Err(error) if error.esource() == &ErrorSource::Upstream);
    if upstreams_fault && connection.reused && replayable {
        // The upstream dropped the pooled connection; a bodiless request that is safe to
        // repeat goes once more on a new one.
        connection = upstream::connect_fresh(upstream)
            .await
            .map_err(upstream_error)?;
        answered = send(session, &mut connection, body, request(session)?).await;
    }
    let sent_whole = answered?;

    let answer = connection
        .session
        .resp_header()
        .ok_or_else(|| upstream_error(Error::new(ErrorType::InvalidHTTPHeader)))?;
    let mut parts = answer.as_owned_parts();
    prepare_response(session, &mut parts);
    respond(&mut parts)?;
    let mut response = ResponseHeader::from(parts);
    let reason = answer.get_reason_phrase();
    if reason != response.status.canonical_reason() {
        response.set_reason_phrase(reason)?;
    }
    session
        .write_response_header(Box::new(response))
        .await
        .map_err(Error::into_down)?;
    while let Some(chunk) = relay_chunk(&mut connection).await? {
        session
            .write_response_body(chunk, false)
            .await
            .map_err(Error::into_down)?;
    }
    if sent_whole {
        connection.release().await;
    }
    Ok(())
}

fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// Writes the head and the body, then reads the response head, skipping interim 1xx answers
/// (a `100 Continue` was already given to the client by the gateway itself). Returns whether
/// the whole request reached the upstream: an app may answer early (a 413, say) and close
/// before reading the rest, and that answer is the client's, not a 502. The connection is
/// then not reused.
async fn send(
    session: &mut ServerSession,
    connection: &mut Connection,
    rules: &BodyRules,
    head: Box<RequestHeader>,
) -> Result<bool> {
    let upstream = &mut connection.session;
    upstream
        .write_request_header(head)
        .await
        .map_err(upstream_error)?;
    let mut received = 0u64;
    let mut write_failed = None;
    loop {
        // The whole body is due by the deadline, however steadily it trickles in. The timer
        // starts only if the read has to wait, so a request without a body pays for none.
        let left = rules.deadline.saturating_duration_since(Instant::now());
        let next = pingora::time::timeout(left, session.read_request_body());
        let Ok(chunk) = next.await else {
            return Error::e_explain(ErrorType::HTTPStatus(408), "request body too slow");
        };
        let Some(chunk) = chunk.map_err(Error::into_down)? else {
            break;
        };
        received += chunk.len() as u64;
        if received > rules.max_bytes {
            return Error::e_explain(ErrorType::HTTPStatus(413), "request body over the ceiling");
        }
        if let Err(error) = upstream.write_body(&chunk).await {
            write_failed = Some(error);
            break;
        }
    }
    if write_failed.is_none() {
        write_failed = upstream.finish_body().await.err();
    }
    loop {
        if let Err(error) = upstream.read_response().await {
            // With no answer to relay, the failed write is the better account of what broke.
            return Err(upstream_error(write_failed.unwrap_or(error)));
        }
        let status = upstream
            .resp_header()
            .map(|response| response.status.as_u16());
        match status {
            Some(101) => {
                let error = Error::explain(ErrorType::InvalidHTTPHeader, "upgrade not asked for");
                return Err(upstream_error(error));
            }
            Some(100..=199) => continue,
            _ => return Ok(write_failed.is_none()),
        }
    }
}

async fn relay_chunk(connection: &mut Connection) -> Result<Option<Bytes>> {
    connection
        .session
        .read_body_bytes()
        .await
        .map_err(upstream_error)
}

/// The client's request head as the upstream should receive it: HTTP/1.1, without
/// hop-by-hop fields or fields the client's `Connection` names, and without `Expect` (the
/// gateway answers `100 Continue` itself). [`RequestHeader::from`] makes it writable.
pub fn upstream_head(session: &ServerSession) -> request::Parts {
    let mut head = session.req_header().as_owned_parts();
    head.version = Version::HTTP_11;

    remove_hop_by_hop(&mut head.headers);
    head.headers.remove(header::EXPECT);
    if head.headers.contains_key(header::TRANSFER_ENCODING) {
        // Pingora's reader decodes a chunked body; the writer chunks it again for the
        // upstream. A length beside chunked framing is meaningless (RFC 9112 section 6.3).
        head.headers.remove(header::CONTENT_LENGTH);
        let chunked = HeaderValue::from_static("chunked");
        head.headers.insert(header::TRANSFER_ENCODING, chunked);
    }
    head
}

/// Readies the upstream's response head for the client: HTTP/1.1, its own connection fields
/// dropped (Pingora writes the client's), and a body without a length sent chunked so the
/// client's connection can stay open.
fn prepare_response(session: &mut ServerSession, response: &mut response::Parts) {
    response.version = Version::HTTP_11;
    remove_hop_by_hop(&mut response.headers);
    let no_body = session.req_header().method == http::Method::HEAD
        || matches!(response.status.as_u16(), 204 | 304);
    if no_body || response.headers.contains_key(header::CONTENT_LENGTH) {
        return;
    }
    if session.req_header().version == Version::HTTP_10 {
        // An HTTP/1.0 client knows no chunked coding (RFC 9112 section 6.1): the body ends
        // when the connection closes.
        response.headers.remove(header::TRANSFER_ENCODING);
        session.set_keepalive(None);
        return;
    }
    let chunked = HeaderValue::from_static("chunked");
    response.headers.insert(header::TRANSFER_ENCODING, chunked);
}

/// Removes the fields that concern one connection only, and those its `Connection` field
/// names, except the ones framing and forwarding rely on.
fn remove_hop_by_hop(fields: &mut http::HeaderMap) {
    let nominated: Vec<HeaderName> = fields
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !PROTECTED.contains(name))
        .collect();
    for name in nominated.iter().chain(HOP_BY_HOP.iter()) {
        fields.remove(name);
    }
}
