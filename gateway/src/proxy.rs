//! The life of a request at the gateway, kept thin: each step hands its decision to the
//! module that owns it and only moves data between them.
//!
//! 1. Read the request head (Pingora's HTTP/1 codec) and pin the configuration generation
//!    in force for the whole request.
//! 2. [`Gateway::screen`]: normalise the path; answer health probes; route; check the head
//!    size; exempt the Stripe webhook; answer CORS preflights; identify the caller; decide
//!    the limits; answer 401, 413, 431, 429 or 503 (store down, `deny` policy) directly when
//!    the request must not go upstream. Only a request that a limit covers reaches the store.
//! 3. Otherwise [`forward`](crate::forward): the routed upstream gets the normalised path and
//!    the resolved client address, the body passes through untouched under its ceiling and
//!    deadline, and the response comes back with the gateway's rate-limit and CORS headers
//!    in place of any the upstream sent.
//! 4. A failure becomes a problem document with the status that names it (408, 413, 502);
//!    then the request is counted by route and status and the connection is kept for the
//!    client's next request when it can be.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{response, HeaderMap, HeaderValue};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::config::{CorsConfig, FailurePolicy, InvalidTokenPolicy, RouteConfig};
use crate::forward::{self, BodyRules};
use crate::generation::Generation;
use crate::identity::Caller;
use crate::limiter::{self, Decision};
use crate::metrics::Metrics;
use crate::routing;

/// Headers the gateway owns on limited routes; an upstream's copies are dropped so that each
/// appears exactly once.
const RATE_LIMIT_HEADERS: [HeaderName; 5] = [
    limiter::X_RATELIMIT_LIMIT,
    limiter::X_RATELIMIT_REMAINING,
    limiter::X_RATELIMIT_RESET,
    limiter::RATELIMIT_POLICY,
    limiter::RATELIMIT,
];

/// A response header the gateway writes: a ready name and a ready value.
type Field = (HeaderName, HeaderValue);

/// CORS response headers the gateway owns on routes with a CORS policy.
const CORS_HEADERS: [HeaderName; 2] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The proxy, as a Pingora HTTP server app: the generation in force and the process-wide
/// metrics.
pub struct Gateway {
    pub current: Arc<ArcSwap<Generation>>,
    pub metrics: Arc<Metrics>,
}

/// What the phases of one request learn and pass on.
pub struct RequestContext {
    generation: Arc<Generation>,
    started: Instant,
    route: Option<Arc<RouteConfig>>,
    label: &'static str,
    normalised_path: String,
    client_ip: Option<IpAddr>,
    /// The request's `Origin`, when the route has a CORS policy that allows it.
    cors_origin: Option<HeaderValue>,
    decision: Option<Decision>,
    body_limit: u64,
}

impl RequestContext {
    fn route_label(&self) -> &str {
        self.route
            .as_ref()
            .map_or(self.label, |route| route.name.as_str())
    }

    fn cors(&self) -> Option<&CorsConfig> {
        self.route.as_ref().and_then(|route| route.cors.as_ref())
    }
}

#[async_trait]
impl HttpServerApp for Gateway {
    /// Serves one request of a client connection and hands the connection back for the next
    /// one when it can be kept.
    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        match session.read_request().await {
            Ok(true) => {}
            Ok(false) => return None,
            Err(error) => {
                if matches!(error.etype(), ErrorType::InvalidHTTPHeader) {
                    let _ = session.respond_error(400).await;
                }
                tracing::debug!(%error, "unreadable request");
                session.shutdown().await;
                return None;
            }
        }
        if *shutdown.borrow() {
            session.set_keepalive(None);
        }

        let mut ctx = self.new_ctx();
        let served = match self.serve(&mut session, &mut ctx).await {
            Ok(()) => true,
            Err(error) => {
                self.fail(&mut session, &error, &ctx).await;
                false
            }
        };
        self.count_request(&session, &ctx);
        if !served {
            return None;
        }
        let settings = HttpPersistentSettings::for_session(&session);
        let reusable = session.finish().await.ok()??;
        Some(ReusedHttpStream::from_reusable_stream(reusable, settings))
    }
}

impl Gateway {
    fn new_ctx(&self) -> RequestContext {
        RequestContext {
            generation: self.current.load_full(),
            started: Instant::now(),
            route: None,
            label: "unrouted",
            normalised_path: String::new(),
            client_ip: None,
            cors_origin: None,
            decision: None,
            body_limit: u64::MAX,
        }
    }

    /// Answers the request at the gateway, or sends it upstream.
    async fn serve(&self, session: &mut ServerSession, ctx: &mut RequestContext) -> Result<()> {
        if self.screen(session, ctx).await? {
            return Ok(());
        }
        if expects_continue(session) {
            // Pingora closes a connection whose response starts before the body is read;
            // an interim 100 is not that response.
            session.set_close_on_response_before_downstream_finish(false);
            let continued = session.write_continue_response().await;
            session.set_close_on_response_before_downstream_finish(true);
            continued.map_err(Error::into_down)?;
        }
        let upstream = ctx
            .route
            .as_ref()
            .map(|route| route.upstream)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))?;
        let body = BodyRules {
            max_bytes: ctx.body_limit,
            deadline: ctx.started + Duration::from_secs(ctx.generation.config.body_timeout_secs),
        };
        let ctx = &*ctx;
        forward::forward(
            session,
            upstream,
            &body,
            |session| upstream_request(session, ctx),
            |response| filter_response(response, ctx),
        )
        .await
    }

    /// Decides whether the gateway answers the request itself (`true`, answer written) or
    /// lets it go upstream (`false`, with the decision and route kept in `ctx`).
    async fn screen(&self, session: &mut ServerSession, ctx: &mut RequestContext) -> Result<bool> {
        let generation = ctx.generation.clone();
        let config = &generation.config;
        session.set_read_timeout(Some(Duration::from_secs(config.body_read_timeout_secs)));
        // Pipelined requests are answered in order and each is counted on its own.
        session.set_pipelining_enabled(true);
        let method = session.req_header().method.as_str().to_owned();
        ctx.normalised_path = routing::normalise(session.req_header().uri.path());
        let path = ctx.normalised_path.clone();

        if head_size(session.req_header()) > config.max_header_bytes {
            let limit = config.max_header_bytes;
            let detail = format!("request headers may be at most {limit} bytes");
            let title = "Request Header Fields Too Large";
            respond_problem(session, ctx, 431, title, &detail).await?;
            return Ok(true);
        }
        if let Some((status, title, detail)) = unservable(session.req_header()) {
            session.set_keepalive(None);
            respond_problem(session, ctx, status, title, detail).await?;
            return Ok(true);
        }
        if config.health_paths.contains(&path) {
            ctx.label = "health";
            respond(session, 200, "text/plain", &[], b"ok\n").await?;
            return Ok(true);
        }
        let blocked = config.blocked_path_prefixes.iter().any(|prefix| {
            path.starts_with(prefix.as_str()) || path == prefix.trim_end_matches('/')
        });
        if blocked {
            ctx.label = "blocked";
            respond_problem(session, ctx, 404, "Not Found", "no route serves this path").await?;
            return Ok(true);
        }
        let Some(route) = generation.router.route(&path) else {
            respond_problem(session, ctx, 404, "Not Found", "no route serves this path").await?;
            return Ok(true);
        };
        ctx.route = Some(route.clone());
        ctx.body_limit = route.max_body_bytes;
        ctx.cors_origin = allowed_origin(route.cors.as_ref(), &session.req_header().headers);
        // Whatever happens next, the upstream learns the address we resolved, never the
        // client's own forwarding claim.
        let peer = peer_ip(session);
        let (client_ip, forwarding_ignored) = generation
            .identifier
            .client_address(peer, &session.req_header().headers);
        ctx.client_ip = Some(client_ip);
        if forwarding_ignored {
            self.metrics.forwarding_ignored.inc();
            tracing::debug!("forwarding header from an untrusted peer ignored");
        }

        if method == "POST" && path == config.webhook_path {
            // The Stripe webhook skips identity and limits entirely; only the ceiling applies.
            ctx.body_limit = config.webhook_max_body_bytes;
            return refuse_oversized(session, ctx).await;
        }
        if refuse_oversized(session, ctx).await? {
            return Ok(true);
        }
        let headers = &session.req_header().headers;
        if method == "OPTIONS" && headers.contains_key("access-control-request-method") {
            // A preflight is the browser asking permission, not a use of the API.
            if let Some(cors) = route.cors.as_ref() {
                let answer = preflight_answer(cors, ctx.cors_origin.as_ref());
                respond(session, 204, "text/plain", &answer, b"").await?;
                return Ok(true);
            }
            return Ok(false);
        }

        // Identity only matters to a limit, or to refuse a bad token when so configured; a
        // request that neither can touch goes upstream without deriving a key.
        let refuses_tokens = config.auth.invalid_token == InvalidTokenPolicy::Reject;
        let has_token = headers.contains_key(http::header::AUTHORIZATION);
        let needs_identity =
            generation.limiter.covers(&method, &path) || (refuses_tokens && has_token);
        if !needs_identity {
            return Ok(false);
        }
        // The address was resolved above; only the caller is left to work out.
        let caller = generation
            .identifier
            .caller(client_ip, &session.req_header().headers);
        if let Caller::Anonymous {
            rejected_token: true,
            ..
        } = caller
        {
            if config.auth.invalid_token == InvalidTokenPolicy::Reject {
                self.metrics
                    .rejected_tokens
                    .with_label_values(&["reject"])
                    .inc();
                return self.refuse_token(session, ctx).await;
            }
            self.metrics
                .rejected_tokens
                .with_label_values(&["anonymous"])
                .inc();
        }

        let decision = generation
            .limiter
            .decide(&method, &path, route.cost, &caller, now_ms())
            .await;
        let Some(decision) = decision else {
            return Ok(false);
        };
        self.count_decision(&decision);
        if let Some(failure) = decision.store_failure {
            tracing::debug!(
                route = %route.name,
                store.error = failure.kind,
                store.policy = ?failure.policy,
                "store failure policy applied"
            );
            if failure.policy == FailurePolicy::Deny {
                let detail = "usage limits cannot be checked right now; retry shortly";
                respond_problem(session, ctx, 503, "Service Unavailable", detail).await?;
                return Ok(true);
            }
        }
        if decision.admitted {
            ctx.decision = Some(decision);
            return Ok(false);
        }

        if let Some(limit) = decision.most_restrictive() {
            tracing::debug!(route = %route.name, limit.name = %limit.name, "request refused");
        }
        self.refuse(session, ctx, &method, &caller, &decision)
            .await?;
        Ok(true)
    }

    /// Answers a request whose exchange failed with the status that names the failure, unless
    /// an answer is already under way or the client is gone; the connection then closes.
    async fn fail(&self, session: &mut ServerSession, error: &Error, ctx: &RequestContext) {
        let status = match (error.etype(), error.esource()) {
            (ErrorType::HTTPStatus(code), _) => *code,
            (ErrorType::ReadTimedout, ErrorSource::Downstream) => 408,
            (ErrorType::ReadTimedout, ErrorSource::Upstream) => 504,
            (
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed,
                ErrorSource::Downstream,
            ) => 0,
            (_, ErrorSource::Downstream) => 400,
            (_, ErrorSource::Upstream) => 502,
            _ => 500,
        };
        let answered = session
            .response_written()
            .is_some_and(|response| !response.status.is_informational());
        // The exchange broke off part-way, so the connection's state is not known: it is
        // closed after this answer, and the answer says so.
        session.set_keepalive(None);
        if status > 0 && !answered {
            let title = match status {
                413 => "Content Too Large",
                _ => http::StatusCode::from_u16(status)
                    .ok()
                    .and_then(|code| code.canonical_reason())
                    .unwrap_or("Error"),
            };
            let detail = match status {
                408 => "the request body was not received in time",
                413 => "the request body is larger than this route accepts",
                502 => "the upstream could not be reached",
                504 => "the upstream did not answer in time",
                _ => "the request could not be proxied",
            };
            if let Err(error) = respond_problem(session, ctx, status, title, detail).await {
                tracing::debug!(%error, "could not send the error response");
            }
        }
        // A client that stalls, hangs up or sends too much is answered and counted, not an
        // operator's problem.
        let clients_doing = error.esource() == &ErrorSource::Downstream
            || matches!(error.etype(), ErrorType::HTTPStatus(_));
        if !clients_doing {
            tracing::warn!(route = ctx.route_label(), %error, "request failed");
        }
    }

    fn count_request(&self, session: &ServerSession, ctx: &RequestContext) {
        let status = session
            .response_written()
            .map_or(0, |response| response.status.as_u16());
        let mut digits = itoa::Buffer::new();
        self.metrics
            .requests
            .with_label_values(&[ctx.route_label(), digits.format(status)])
            .inc();
    }

    fn count_decision(&self, decision: &Decision) {
        let outcome = if decision.admitted {
            "allowed"
        } else {
            "refused"
        };
        for status in &decision.limits {
            self.metrics
                .decisions
                .with_label_values(&[&*status.name, outcome])
                .inc();
        }
        for (name, refused) in &decision.shadow {
            let outcome = if *refused {
                "shadow_refused"
            } else {
                "shadow_allowed"
            };
            self.metrics
                .decisions
                .with_label_values(&[&**name, outcome])
                .inc();
        }
        if decision.untracked {
            self.metrics.untracked_decisions.inc();
        }
        if let Some(failure) = decision.store_failure {
            let policy = match failure.policy {
                FailurePolicy::Allow => "allow",
                FailurePolicy::Deny => "deny",
                FailurePolicy::Local => "local",
            };
            self.metrics
                .store_fallbacks
                .with_label_values(&[policy])
                .inc();
        }
    }

    /// Answers 401 with a bearer challenge; used when invalid tokens are configured to reject.
    async fn refuse_token(
        &self,
        session: &mut ServerSession,
        ctx: &RequestContext,
    ) -> Result<bool> {
        let challenge = HeaderValue::from_static("Bearer error=\"invalid_token\"");
        let mut headers = vec![(header::WWW_AUTHENTICATE, challenge)];
        headers.extend(cors_headers(ctx.cors(), ctx.cors_origin.as_ref()));
        let body = problem(
            401,
            "Unauthorized",
            "the bearer token is invalid or expired",
        );
        drain_small_body(session).await;
        respond(session, 401, "application/problem+json", &headers, &body).await?;
        Ok(true)
    }

    /// Answers 429 with the rate-limit headers and a problem body; the upstream is not called.
    async fn refuse(
        &self,
        session: &mut ServerSession,
        ctx: &RequestContext,
        method: &str,
        caller: &Caller,
        decision: &Decision,
    ) -> Result<()> {
        let config = &ctx.generation.config;
        let wait = decision.retry_after_secs();
        let name = decision.most_restrictive().map_or("", |limit| &*limit.name);
        let mut body = serde_json::json!({
            "type": "about:blank",
            "title": "Too Many Requests",
            "status": 429,
            "detail": format!("limit {name} is used up; retry in {wait} seconds"),
            "limit": name,
            "retry_after": wait,
        });
        if matches!(caller, Caller::Anonymous { .. }) {
            body["sign_in"] = config.sign_in_url.as_str().into();
            body["buy_tokens"] = config.buy_tokens_url.as_str().into();
        }
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let mut headers = decision.headers();
        headers.extend(cors_headers(ctx.cors(), ctx.cors_origin.as_ref()));
        drain_small_body(session).await;
        respond(session, 429, "application/problem+json", &headers, &body).await
    }
}

/// The head the upstream receives: the client's, with the address the gateway resolved in
/// place of any forwarding claim, and the normalised path.
fn upstream_request(session: &ServerSession, ctx: &RequestContext) -> Result<Box<RequestHeader>> {
    let mut request = forward::upstream_head(session);
    if let Some(client) = ctx.client_ip {
        // The app learns the address we resolved, never the client's own claim.
        request
            .headers
            .insert(X_FORWARDED_FOR, address_value(client));
        request.headers.remove(header::FORWARDED);
        // Apps that read fields the CGI way see `X_Forwarded_For` as `X-Forwarded-For`.
        let spoofs: Vec<HeaderName> = request
            .headers
            .keys()
            .filter(|name| name.as_str().contains('_'))
            .filter(|name| {
                let dashed = name.as_str().replace('_', "-");
                dashed == "x-forwarded-for" || dashed == "forwarded"
            })
            .cloned()
            .collect();
        for name in spoofs {
            request.headers.remove(name);
        }
    }
    if request.uri.path() == ctx.normalised_path {
        return Ok(Box::new(request.into()));
    }
    let target = match request.uri.query() {
        Some(query) => format!("{}?{query}", ctx.normalised_path),
        None => ctx.normalised_path.clone(),
    };
    request.uri = target
        .parse()
        .map_err(|_| Error::explain(ErrorType::InternalError, "normalised path is not a URI"))?;
    Ok(Box::new(request.into()))
}

/// Puts the gateway's rate-limit and CORS headers on an upstream response, in place of any
/// copies the upstream sent.
fn filter_response(response: &mut response::Parts, ctx: &RequestContext) -> Result<()> {
    let fields = &mut response.headers;
    if let Some(decision) = &ctx.decision {
        let headers = decision.headers();
        if !headers.is_empty() {
            remove_owned(fields, &RATE_LIMIT_HEADERS);
            for (name, value) in headers {
                fields.insert(name, value);
            }
        }
    }
    if ctx.cors().is_some() {
        remove_owned(fields, &CORS_HEADERS);
        let varies_by_origin = fields.get_all(header::VARY).iter().any(|value| {
            let value = value.to_str().unwrap_or_default();
            value
                .split(',')
                .any(|field| field.trim().eq_ignore_ascii_case("origin"))
        });
        for (name, value) in cors_headers(ctx.cors(), ctx.cors_origin.as_ref()) {
            if name == header::VARY && varies_by_origin {
                continue;
            }
            fields.append(name, value);
        }
    }
    Ok(())
}

/// Why a request cannot be served at all, if it cannot: an HTTP/1.1 request without `Host`
/// (RFC 9112 section 3.2), a tunnel, or a body coding other than chunked, which the
/// gateway would otherwise pass on as something it is not.
fn unservable(request: &RequestHeader) -> Option<(u16, &'static str, &'static str)> {
    if request.version == http::Version::HTTP_11 && !request.headers.contains_key(header::HOST) {
        return Some((400, "Bad Request", "an HTTP/1.1 request must carry Host"));
    }
    if request.method == http::Method::CONNECT {
        return Some((501, "Not Implemented", "the gateway does not open tunnels"));
    }
    let codings = request.headers.get_all(header::TRANSFER_ENCODING).iter();
    let only_chunked = codings
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|coding| !coding.is_empty())
        .all(|coding| coding.eq_ignore_ascii_case("chunked"));
    if !only_chunked {
        let detail = "the gateway decodes no transfer coding but chunked";
        return Some((501, "Not Implemented", detail));
    }
    None
}

/// Whether the client waits for `100 Continue` before it sends its body.
fn expects_continue(session: &ServerSession) -> bool {
    session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Largest request body read and discarded so that a refused request's connection stays
/// open for the client's next request; a larger or unreadable one closes the connection.
const DRAIN_LIMIT_BYTES: usize = 64 * 1024;

/// Longest wait for that body; a slower one closes the connection instead.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// Consumes the body of a request the gateway answers itself, when it is small, so that a
/// keep-alive or pipelining client can go on with its next request on the same connection.
async fn drain_small_body(session: &mut ServerSession) {
    if expects_continue(session) {
        // The client waits to be told to send its body; it is told no, at once, and the
        // connection closes with the body unsent.
        session.set_keepalive(None);
        return;
    }
    let drain = async {
        let mut drained = 0;
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    drained += chunk.len();
                    if drained > DRAIN_LIMIT_BYTES {
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    };
    let drained = tokio::time::timeout(DRAIN_TIME, drain).await;
    if drained != Ok(true) {
        session.set_keepalive(None);
    }
}

/// Answers 413 before reading a body whose declared length is over the route's ceiling.
async fn refuse_oversized(session: &mut ServerSession, ctx: &RequestContext) -> Result<bool> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_none_or(|length| length <= ctx.body_limit) {
        return Ok(false);
    }
    let detail = format!("the request body may be at most {} bytes", ctx.body_limit);
    // The body stays unread, so the connection closes, and the answer says so.
    session.set_keepalive(None);
    respond_problem(session, ctx, 413, "Content Too Large", &detail).await?;
    Ok(true)
}

/// The `Origin` of the request when the route's CORS policy allows it.
fn allowed_origin(cors: Option<&CorsConfig>, headers: &HeaderMap) -> Option<HeaderValue> {
    let value = headers.get(http::header::ORIGIN)?;
    let origin = value.to_str().ok()?;
    let allowed = cors?
        .allow_origins
        .iter()
        .any(|allowed| allowed == "*" || allowed == origin);
    allowed.then(|| value.clone())
}

/// CORS headers for an actual response on a route with a CORS policy: `Vary: Origin` always
/// (the answer depends on it), the rest only for an allowed origin.
fn cors_headers(cors: Option<&CorsConfig>, origin: Option<&HeaderValue>) -> Vec<Field> {
    let Some(cors) = cors else {
        return Vec::new();
    };
    let vary = (header::VARY, HeaderValue::from_static("Origin"));
    let Some(origin) = origin else {
        return vec![vary];
    };
    let mut headers = vec![(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()), vary];
    if let Some(expose) = &cors.expose_headers {
        headers.push((header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone()));
    }
    headers
}

fn preflight_answer(cors: &CorsConfig, origin: Option<&HeaderValue>) -> Vec<Field> {
    let vary = (header::VARY, HeaderValue::from_static("Origin"));
    let Some(origin) = origin else {
        return vec![vary];
    };
    let mut headers = vec![
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()),
        (
            header::ACCESS_CONTROL_ALLOW_METHODS,
            cors.allow_methods.clone(),
        ),
        (header::ACCESS_CONTROL_MAX_AGE, cors.max_age.clone()),
        vary,
    ];
    if let Some(allow) = &cors.allow_headers {
        headers.push((header::ACCESS_CONTROL_ALLOW_HEADERS, allow.clone()));
    }
    headers
}

/// Drops the upstream's copies of headers the gateway writes itself. Most upstreams send
/// none, and one pass over the response is cheaper than a lookup per name.
fn remove_owned(fields: &mut HeaderMap, names: &[HeaderName]) {
    let mut present = Vec::new();
    for name in fields.keys() {
        if let Some(owned) = names.iter().find(|owned| *owned == name) {
            present.push(owned);
        }
    }
    for name in present {
        fields.remove(name);
    }
}

/// Size of the request line and headers as they arrived, give or take separators.
fn head_size(request: &RequestHeader) -> usize {
    let line = request.method.as_str().len() + request.uri.to_string().len() + 12;
    let fields: usize = request
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    line + fields
}

/// The address as a header value; IPv4, the common case, without the formatting machinery.
fn address_value(address: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = address else {
        return HeaderValue::try_from(address.to_string()).expect("an address is a valid value");
    };
    let mut text = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (index, octet) in v4.octets().into_iter().enumerate() {
        if index > 0 {
            text.push('.');
        }
        text.push_str(digits.format(octet));
    }
    HeaderValue::try_from(text).expect("an address is a valid value")
}

fn peer_ip(session: &ServerSession) -> IpAddr {
    session
        .client_addr()
        .and_then(|address| address.as_inet())
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |address| address.ip())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

fn problem(status: u16, title: &str, detail: &str) -> Vec<u8> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    });
    body.to_string().into_bytes()
}

async fn respond_problem(
    session: &mut ServerSession,
    ctx: &RequestContext,
    status: u16,
    title: &str,
    detail: &str,
) -> Result<()> {
    // An admitted request that fails later (a 502, a body over the ceiling) still reports
    // where its limits stand.
    let mut headers = ctx
        .decision
        .as_ref()
        .map(Decision::headers)
        .unwrap_or_default();
    headers.extend(cors_headers(ctx.cors(), ctx.cors_origin.as_ref()));
    let body = problem(status, title, detail);
    respond(session, status, "application/problem+json", &headers, &body).await
}

async fn respond(
    session: &mut ServerSession,
    status: u16,
    content_type: &'static str,
    headers: &[Field],
    body: &[u8],
) -> Result<()> {
    let (mut response, ()) = http::Response::new(()).into_parts();
    response.status = http::StatusCode::from_u16(status)
        .map_err(|_| Error::explain(ErrorType::InternalError, "invalid status"))?;
    let fields = &mut response.headers;
    fields.reserve(headers.len() + 2);
    if !body.is_empty() {
        fields.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if status != 204 {
        fields.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    for (name, value) in headers {
        fields.append(name.clone(), value.clone());
    }
    let response = ResponseHeader::from(response);
    session.write_response_header(Box::new(response)).await?;
    if !body.is_empty() {
        session
            .write_response_body(Bytes::copy_from_slice(body), true)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_addresses_read_as_their_standard_text() {
        for text in [
            "0.0.0.0",
            "10.0.10.100",
            "192.0.2.1",
            "255.255.255.255",
            "2001:db8::1",
        ] {
            assert_eq!(address_value(text.parse().unwrap()), text);
        }
    }
}
