//! The Pingora phases of a request, kept thin: each phase hands its decision to the module
//! that owns it and only moves data between them.
//!
//! Life of a request:
//! 1. `request_filter`: normalise the path; answer health probes; route; exempt the Stripe
//!    webhook; identify the caller; decide the limits; answer 401, 413 or 429 directly when
//!    the request must not reach an upstream.
//! 2. `request_body_filter`: enforce the body ceiling on bodies without a `Content-Length`.
//! 3. `upstream_peer` / `upstream_request_filter`: pick the routed upstream and send it the
//!    normalised path; body and other headers pass through untouched.
//! 4. `response_filter`: replace any rate-limit headers of the upstream with ours.
//! 5. `logging`: count the request by route and status.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::{HttpPeer, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};

use crate::config::{GatewayConfig, InvalidTokenPolicy};
use crate::identity::{Caller, Identifier};
use crate::limiter::{Decision, Limiter};
use crate::metrics::Metrics;
use crate::routing::{self, Router};

/// Headers the gateway owns on limited routes; an upstream's copies are dropped so that each
/// appears exactly once.
const RATE_LIMIT_HEADERS: [&str; 5] = [
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "ratelimit-policy",
    "ratelimit",
];

/// The proxy: configuration, identity, limits and metrics shared by all requests.
pub struct Gateway {
    pub config: GatewayConfig,
    pub router: Router,
    pub identifier: Identifier,
    pub limiter: Limiter,
    pub metrics: Arc<Metrics>,
}

/// What the phases of one request learn and pass on.
#[derive(Default)]
pub struct RequestContext {
    route: &'static str,
    route_name: Option<String>,
    upstream: Option<SocketAddr>,
    normalised_path: String,
    decision: Option<Decision>,
    body_limit: Option<u64>,
    body_seen: u64,
}

impl RequestContext {
    fn route_label(&self) -> &str {
        self.route_name.as_deref().unwrap_or(self.route)
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestContext;

    fn new_ctx(&self) -> Self::CTX {
        RequestContext::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        session.set_read_timeout(Some(Duration::from_secs(
            self.config.body_read_timeout_secs,
        )));
        let method = session.req_header().method.as_str().to_owned();
        ctx.normalised_path = routing::normalise(session.req_header().uri.path());
        let path = ctx.normalised_path.as_str();

        if self.config.health_paths.iter().any(|health| health == path) {
            ctx.route = "health";
            respond(session, 200, "text/plain", &[], b"ok\n").await?;
            return Ok(true);
        }
        let Some((route, upstream)) = self.router.route(path) else {
            ctx.route = "unrouted";
            respond_problem(session, 404, "Not Found", "no route serves this path", &[]).await?;
            return Ok(true);
        };
        ctx.route_name = Some(route.to_owned());
        ctx.upstream = Some(upstream);

        if method == "POST" && path == self.config.webhook_path {
            return self.admit_webhook(session, ctx).await;
        }
        if method == "OPTIONS"
            && session
                .req_header()
                .headers
                .contains_key("access-control-request-method")
        {
            // A CORS preflight is the browser asking permission, not a use of the API.
            return Ok(false);
        }

        let peer = peer_ip(session);
        let authorization = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION);
        let caller = self
            .identifier
            .identify(peer, authorization.map(|value| value.as_bytes()));
        if let Caller::Anonymous {
            rejected_token: true,
            ..
        } = caller
        {
            if self.config.invalid_token == InvalidTokenPolicy::Reject {
                self.metrics
                    .rejected_tokens
                    .with_label_values(&["reject"])
                    .inc();
                let challenge = [("www-authenticate", "Bearer error=\"invalid_token\"".into())];
                let detail = "the bearer token is invalid or expired";
                respond_problem(session, 401, "Unauthorized", detail, &challenge).await?;
                return Ok(true);
            }
            self.metrics
                .rejected_tokens
                .with_label_values(&["anonymous"])
                .inc();
        }

        let Some(decision) = self.limiter.decide(&method, path, &caller, now_ms()) else {
            return Ok(false);
        };
        for status in &decision.limits {
            let outcome = if decision.admitted {
                "allowed"
            } else {
                "refused"
            };
            self.metrics
                .decisions
                .with_label_values(&[&*status.name, outcome])
                .inc();
        }
        if decision.admitted {
            ctx.decision = Some(decision);
            return Ok(false);
        }

        tracing::debug!(route, limit.name = %decision.most_restrictive().name, "request refused");
        self.refuse(session, &method, &caller, &decision).await?;
        Ok(true)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let (Some(limit), Some(chunk)) = (ctx.body_limit, body.as_ref()) else {
            return Ok(());
        };
        ctx.body_seen += chunk.len() as u64;
        if ctx.body_seen > limit {
            return Err(Error::explain(
                ErrorType::HTTPStatus(413),
                "request body over the ceiling",
            ));
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let upstream = ctx
            .upstream
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))?;
        Ok(Box::new(HttpPeer::new(upstream, false, String::new())))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        request: &mut pingora::http::RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if request.uri.path() == ctx.normalised_path {
            return Ok(());
        }
        let target = match request.uri.query() {
            Some(query) => format!("{}?{query}", ctx.normalised_path),
            None => ctx.normalised_path.clone(),
        };
        let uri = target.parse().map_err(|_| {
            Error::explain(ErrorType::InternalError, "normalised path is not a URI")
        })?;
        request.set_uri(uri);
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        let Some(decision) = &ctx.decision else {
            return Ok(());
        };
        for name in RATE_LIMIT_HEADERS {
            response.remove_header(name);
        }
        for (name, value) in decision.headers() {
            response.insert_header(name, value)?;
        }
        Ok(())
    }

    async fn logging(&self, session: &mut Session, _error: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session
            .response_written()
            .map_or(0, |response| response.status.as_u16());
        self.metrics
            .requests
            .with_label_values(&[ctx.route_label(), &status.to_string()])
            .inc();
    }
}

impl Gateway {
    /// The Stripe webhook skips identity and limits entirely; only the body ceiling applies.
    async fn admit_webhook(&self, session: &mut Session, ctx: &mut RequestContext) -> Result<bool> {
        let ceiling = self.config.webhook_max_body_bytes;
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > ceiling) {
            let detail = format!("the webhook body may be at most {ceiling} bytes");
            respond_problem(session, 413, "Content Too Large", &detail, &[]).await?;
            session.set_keepalive(None);
            return Ok(true);
        }
        ctx.body_limit = Some(ceiling);
        Ok(false)
    }

    /// Answers 429 with the rate-limit headers and a problem body; the upstream is not called.
    async fn refuse(
        &self,
        session: &mut Session,
        method: &str,
        caller: &Caller,
        decision: &Decision,
    ) -> Result<()> {
        let limit = decision.most_restrictive();
        let wait = decision.retry_after_secs();
        let mut body = serde_json::json!({
            "type": "about:blank",
            "title": "Too Many Requests",
            "status": 429,
            "detail": format!("limit {} is used up; retry in {wait} seconds", limit.name),
            "limit": &*limit.name,
            "retry_after": wait,
        });
        if matches!(caller, Caller::Anonymous { .. }) {
            body["sign_in"] = self.config.sign_in_url.as_str().into();
            body["buy_tokens"] = self.config.buy_tokens_url.as_str().into();
        }
        let body = if method == "HEAD" {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        respond(
            session,
            429,
            "application/problem+json",
            &decision.headers(),
            &body,
        )
        .await
    }
}

fn peer_ip(session: &Session) -> IpAddr {
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

async fn respond_problem(
    session: &mut Session,
    status: u16,
    title: &str,
    detail: &str,
    headers: &[(&'static str, String)],
) -> Result<()> {
    let body = serde_json::json!({
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    });
    respond(
        session,
        status,
        "application/problem+json",
        headers,
        body.to_string().as_bytes(),
    )
    .await
}

async fn respond(
    session: &mut Session,
    status: u16,
    content_type: &str,
    headers: &[(&'static str, String)],
    body: &[u8],
) -> Result<()> {
    let mut response = ResponseHeader::build(status, Some(headers.len() + 2))?;
    response.insert_header("content-type", content_type)?;
    response.insert_header("content-length", body.len().to_string())?;
    for (name, value) in headers {
        response.insert_header(*name, value.as_str())?;
    }
    session
        .write_response_header(Box::new(response), body.is_empty())
        .await?;
    if !body.is_empty() {
        session
            .write_response_body(Some(Bytes::copy_from_slice(body)), true)
            .await?;
    }
    Ok(())
}
