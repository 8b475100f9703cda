//! A local stand-in for Stripe's `POST /v1/checkout/sessions`, strict enough to catch a
//! request Stripe would refuse, and able to fail on command.
//!
//! What it copies from Stripe (https://docs.stripe.com/api/checkout/sessions/create,
//! https://docs.stripe.com/api/idempotent_requests, https://docs.stripe.com/error-low-level):
//!
//! - A request without a `Bearer sk_...` key is 401. A form lacking a required field, with an
//!   unknown field, a non-positive `unit_amount` or `quantity`, a relative URL, or an
//!   `expires_at` outside 30 min to 24 h from now (on the stand-in's clock) is 400 with
//!   `{"error": {"type": "invalid_request_error", "param", "message"}}`.
//! - A valid form creates a session shaped like Stripe's official `checkout.session` fixture.
//! - The answer to a created session is stored under its `Idempotency-Key` for 24 h: the same
//!   key with the same body gets the same status and body byte for byte (marked
//!   `Idempotent-Replayed: true`), the same key with another body gets 400
//!   `idempotency_error`. As at Stripe, a request that never started executing (refused as
//!   invalid, or failed by an injected [`Fault`]) stores nothing, so its retry runs afresh.
//! - Every answer has its own `Request-Id`.
//!
//! Every request is recorded, faulted or not, for assertions.
//!
//! This file is also compiled into `examples/stripe_stand_in.rs`, so it uses nothing from
//! the test helpers around it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use reqwest::Url;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How long Stripe keeps the answer to an idempotent request.
pub const IDEMPOTENCY_WINDOW_SECS: i64 = 24 * 3600;

/// Earliest and latest `expires_at` Stripe accepts, in seconds after the request arrives.
pub const EXPIRES_AT_MIN_SECS: i64 = 30 * 60;
pub const EXPIRES_AT_MAX_SECS: i64 = 24 * 3600;

/// Marks the stand-in's clock as following the system clock.
const NOT_FROZEN: i64 = i64::MIN;

/// Form fields that must be present in every request.
pub const REQUIRED: &[&str] = &[
    "mode",
    "line_items[0][price_data][currency]",
    "line_items[0][price_data][unit_amount]",
    "line_items[0][price_data][product_data][name]",
    "line_items[0][quantity]",
    "success_url",
    "cancel_url",
];

/// Fields accepted besides [`REQUIRED`]; keys under `metadata[...]` and
/// `payment_intent_data[metadata][...]` are accepted too.
const OPTIONAL: &[&str] = &["client_reference_id", "customer_email", "expires_at"];

/// What the stand-in does to a request instead of (or before) handling it.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Answer `status` with a Stripe error body and `Stripe-Should-Retry: should_retry`,
    /// without executing the request or storing anything under its idempotency key.
    Status { status: u16, should_retry: bool },
    /// Wait this long, then handle the request normally. The work finishes even if the
    /// caller has hung up, as at Stripe, so a session may exist that nobody was told about.
    Hang(Duration),
}

impl Fault {
    /// A transient failure Stripe marks as worth retrying.
    pub fn retryable(status: u16) -> Self {
        Self::Status {
            status,
            should_retry: true,
        }
    }
}

/// One request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    /// The body exactly as sent.
    pub body: String,
    /// The body decoded as a form; empty if it is not one.
    pub form: Vec<(String, String)>,
    /// When it arrived, to measure the pause between a failure and its retry.
    pub received: Instant,
}

impl Recorded {
    /// The value of header `name` as text; empty if absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
    }
}

/// The answer stored under an idempotency key.
#[derive(Clone)]
struct StoredAnswer {
    request_body: String,
    status: StatusCode,
    body: Bytes,
    stored_at: i64,
}

#[derive(Default)]
struct Books {
    recorded: Vec<Recorded>,
    faults: VecDeque<Fault>,
    answers: HashMap<String, StoredAnswer>,
    sessions_created: usize,
    /// Requests still working after a [`Fault::Hang`], awaited by [`StripeStandIn::settle`].
    hung: Vec<JoinHandle<()>>,
}

struct Shared {
    books: Mutex<Books>,
    /// Added to the system clock, in seconds; moved by [`StripeStandIn::advance_clock`].
    clock_offset_secs: AtomicI64,
    /// The time the clock is frozen at, or [`NOT_FROZEN`]; see [`StripeStandIn::freeze_clock`].
    frozen_at: AtomicI64,
    /// The official `checkout.session` fixture, which every created session starts from.
    template: Value,
}

impl Shared {
    fn books(&self) -> MutexGuard<'_, Books> {
        self.books
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn now(&self) -> i64 {
        let frozen = self.frozen_at.load(Ordering::SeqCst);
        if frozen != NOT_FROZEN {
            return frozen;
        }
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs() as i64);
        system + self.clock_offset_secs.load(Ordering::SeqCst)
    }
}

/// The stand-in, serving on a loopback port until dropped with its runtime.
pub struct StripeStandIn {
    /// Where to point `STRIPE_API_BASE`.
    pub base: Url,
    shared: Arc<Shared>,
}

impl StripeStandIn {
    /// Serves on a fresh port of 127.0.0.1.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        Self::serve(listener)
    }

    /// Serves on an already bound listener.
    pub fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("bound address");
        let shared = Arc::new(Shared {
            books: Mutex::new(Books::default()),
            clock_offset_secs: AtomicI64::new(0),
            frozen_at: AtomicI64::new(NOT_FROZEN),
            template: session_template(),
        });
        let router = Router::new()
            .route("/v1/checkout/sessions", post(create_session))
            .fallback(unknown_route)
            .with_state(shared.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self {
            base: Url::parse(&format!("http://{addr}")).expect("valid URL"),
            shared,
        }
    }

    /// Applies `fault` to each of the next `count` requests, after any faults already queued.
    pub fn fail_next(&self, count: usize, fault: Fault) {
        let mut books = self.shared.books();
        books.faults.extend(std::iter::repeat_n(fault, count));
    }

    /// Stops the stand-in's clock (used for `expires_at` and the idempotency window) at
    /// `unix_secs`, so that tests of exact boundaries cannot race a second changing.
    pub fn freeze_clock(&self, unix_secs: i64) {
        self.shared.frozen_at.store(unix_secs, Ordering::SeqCst);
    }

    /// Moves the stand-in's clock by `secs`, which may be negative to play a Stripe whose
    /// clock is behind ours.
    pub fn advance_clock(&self, secs: i64) {
        let frozen = self.shared.frozen_at.load(Ordering::SeqCst);
        if frozen == NOT_FROZEN {
            let offset = &self.shared.clock_offset_secs;
            offset.fetch_add(secs, Ordering::SeqCst);
        } else {
            self.shared.frozen_at.store(frozen + secs, Ordering::SeqCst);
        }
    }

    /// The stand-in's current time, in Unix seconds.
    pub fn now(&self) -> i64 {
        self.shared.now()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.books().recorded.clone()
    }

    /// How many distinct sessions were created; replays do not count.
    pub fn sessions_created(&self) -> usize {
        self.shared.books().sessions_created
    }

    /// Waits until every request held by a [`Fault::Hang`] has finished its work.
    pub async fn settle(&self) {
        loop {
            let hung = std::mem::take(&mut self.shared.books().hung);
            if hung.is_empty() {
                return;
            }
            for task in hung {
                let _ = task.await;
            }
        }
    }
}

async fn create_session(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let recorded = record(&shared, method, &uri, &headers, &body);
    let (body, form) = (recorded.body, recorded.form);
    let fault = shared.books().faults.pop_front();

    let (status, body, replayed) = match fault {
        Some(Fault::Status {
            status,
            should_retry,
        }) => {
            let status = StatusCode::from_u16(status).expect("a valid fault status");
            let mut response = stripe_error(status, fault_error(status));
            let retry = HeaderValue::from_static(if should_retry { "true" } else { "false" });
            response.headers_mut().insert("stripe-should-retry", retry);
            return with_request_id(response);
        }
        Some(Fault::Hang(delay)) => {
            // The work runs in its own task so that a caller hanging up cannot cancel it.
            let (sender, receiver) = tokio::sync::oneshot::channel();
            let worker = shared.clone();
            let task = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = sender.send(execute(&worker, &headers, &body, &form));
            });
            shared.books().hung.push(task);
            match receiver.await {
                Ok(answer) => answer,
                Err(_) => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            }
        }
        None => execute(&shared, &headers, &body, &form),
    };

    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    with_request_id(response)
}

/// Authenticates, replays or refuses by idempotency key, validates, and creates: the
/// request as Stripe executes it. Returns the status, the body and whether it is a replay.
fn execute(
    shared: &Shared,
    headers: &HeaderMap,
    body: &str,
    form: &[(String, String)],
) -> (StatusCode, Bytes, bool) {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    let has_key = header("authorization")
        .and_then(|value| value.strip_prefix("Bearer sk_"))
        .is_some_and(|rest| !rest.is_empty());
    if !has_key {
        let error = json!({
            "type": "invalid_request_error",
            "message": "no valid secret API key was provided as a Bearer token",
        });
        return error_answer(StatusCode::UNAUTHORIZED, error);
    }

    let now = shared.now();
    let key = header("idempotency-key").map(str::to_owned);
    let mut books = shared.books();
    if let Some(key) = &key {
        books
            .answers
            .retain(|_, stored| now - stored.stored_at < IDEMPOTENCY_WINDOW_SECS);
        if let Some(stored) = books.answers.get(key) {
            if stored.request_body != body {
                let error = json!({
                    "type": "idempotency_error",
                    "message": format!(
                        "idempotency key {key} was already used with different parameters"
                    ),
                });
                return error_answer(StatusCode::BAD_REQUEST, error);
            }
            return (stored.status, stored.body.clone(), true);
        }
    }

    if let Err((param, message)) = validate(form, now) {
        let error = json!({
            "type": "invalid_request_error",
            "code": "parameter_invalid",
            "param": param,
            "message": message,
        });
        return error_answer(StatusCode::BAD_REQUEST, error);
    }

    let session = new_session(&shared.template, form, now);
    let answer = Bytes::from(serde_json::to_vec_pretty(&session).expect("a session serialises"));
    books.sessions_created += 1;
    if let Some(key) = key {
        let stored = StoredAnswer {
            request_body: body.to_owned(),
            status: StatusCode::OK,
            body: answer.clone(),
            stored_at: now,
        };
        books.answers.insert(key, stored);
    }
    (StatusCode::OK, answer, false)
}

/// Checks a create-session form as Stripe does for a one-time payment; on failure returns
/// the offending parameter and a message.
fn validate(form: &[(String, String)], now: i64) -> Result<(), (String, String)> {
    let refuse = |param: &str, message: String| Err((param.to_owned(), message));
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };

    for (key, _) in form {
        let known = REQUIRED.contains(&key.as_str())
            || OPTIONAL.contains(&key.as_str())
            || is_metadata_key(key, "metadata[")
            || is_metadata_key(key, "payment_intent_data[metadata][");
        if !known {
            return refuse(key, format!("received unknown parameter: {key}"));
        }
        if form.iter().filter(|(other, _)| other == key).count() > 1 {
            return refuse(key, format!("parameter {key} was given more than once"));
        }
    }
    for name in REQUIRED {
        if field(name).is_none_or(str::is_empty) {
            return refuse(name, format!("missing required param: {name}"));
        }
    }

    if field("mode") != Some("payment") {
        return refuse(
            "mode",
            "this stand-in supports only mode=payment".to_owned(),
        );
    }
    let currency = field("line_items[0][price_data][currency]").unwrap_or_default();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
        let message = format!("invalid currency: {currency}");
        return refuse("line_items[0][price_data][currency]", message);
    }
    for name in [
        "line_items[0][price_data][unit_amount]",
        "line_items[0][quantity]",
    ] {
        let value = field(name).unwrap_or_default();
        if value.parse::<u64>().ok().filter(|n| *n > 0).is_none() {
            return refuse(name, format!("invalid positive integer: {value}"));
        }
    }
    for name in ["success_url", "cancel_url"] {
        let value = field(name).unwrap_or_default();
        let absolute = Url::parse(value).is_ok_and(|url| url.has_host());
        if !absolute {
            return refuse(name, format!("not a valid URL: {value}"));
        }
    }
    if field("client_reference_id").is_some_and(|reference| reference.len() > 200) {
        let message = "client_reference_id is longer than 200 characters".to_owned();
        return refuse("client_reference_id", message);
    }
    if let Some(text) = field("expires_at") {
        let Ok(expires_at) = text.parse::<i64>() else {
            return refuse("expires_at", format!("invalid integer: {text}"));
        };
        let earliest = now + EXPIRES_AT_MIN_SECS;
        let latest = now + EXPIRES_AT_MAX_SECS;
        if !(earliest..=latest).contains(&expires_at) {
            let message = format!(
                "expires_at must be between 30 minutes and 24 hours from now \
                 ({earliest} to {latest}); got {expires_at}"
            );
            return refuse("expires_at", message);
        }
    }
    Ok(())
}

/// `metadata[<key>]` with a key of 1 to 40 characters, as Stripe allows.
fn is_metadata_key(field: &str, prefix: &str) -> bool {
    field
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(']'))
        .is_some_and(|key| (1..=40).contains(&key.len()) && !key.contains(['[', ']']))
}

/// A new open, unpaid session for a validated form, on the official fixture's shape.
fn new_session(template: &Value, form: &[(String, String)], now: i64) -> Value {
    let field = |name: &str| {
        form.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let number = |name: &str| field(name).and_then(|value| value.parse::<i64>().ok());
    let metadata = |prefix: &str| {
        let entries = form.iter().filter_map(|(key, value)| {
            let name = key.strip_prefix(prefix)?.strip_suffix(']')?;
            Some((name.to_owned(), Value::from(value.as_str())))
        });
        Value::Object(entries.collect())
    };
    let amount = number("line_items[0][price_data][unit_amount]").unwrap_or_default()
        * number("line_items[0][quantity]").unwrap_or_default();
    let id = format!("cs_test_a1{}", random_alphanumeric(56));

    let mut session = template.clone();
    let overrides = json!({
        "id": id,
        "object": "checkout.session",
        "url": format!("https://checkout.stripe.com/c/pay/{id}"),
        "created": now,
        "expires_at": number("expires_at").unwrap_or(now + EXPIRES_AT_MAX_SECS),
        "livemode": false,
        "mode": "payment",
        "status": "open",
        "payment_status": "unpaid",
        "payment_intent": null,
        "amount_subtotal": amount,
        "amount_total": amount,
        "currency": field("line_items[0][price_data][currency]"),
        "client_reference_id": field("client_reference_id"),
        "customer_email": field("customer_email"),
        "customer_details": null,
        "metadata": metadata("metadata["),
        "success_url": field("success_url"),
        "cancel_url": field("cancel_url"),
        "shipping_cost": null,
        "shipping_address_collection": null,
        "currency_conversion": null,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
    });
    if let (Some(session), Some(overrides)) = (session.as_object_mut(), overrides.as_object()) {
        for (key, value) in overrides {
            session.insert(key.clone(), value.clone());
        }
    }
    session
}

/// Stripe's own `checkout.session` fixture from `shared/stripe/fixtures/official/`.
fn session_template() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/stripe/fixtures/official/checkout_session.fixtures3.json");
    let text = std::fs::read(&path)
        .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
    serde_json::from_slice(&text).expect("the official fixture is JSON")
}

/// The error body Stripe gives for each status an injected fault can take.
fn fault_error(status: StatusCode) -> Value {
    match status.as_u16() {
        409 => json!({
            "type": "idempotency_error",
            "message": "another request with this idempotency key is still being processed",
        }),
        429 => json!({
            "type": "invalid_request_error",
            "code": "rate_limit",
            "message": "too many requests hit the API too quickly",
        }),
        400..=499 => json!({
            "type": "invalid_request_error",
            "message": "the request was refused",
        }),
        _ => json!({
            "type": "api_error",
            "message": "something went wrong on the payment provider's side",
        }),
    }
}

fn error_answer(status: StatusCode, error: Value) -> (StatusCode, Bytes, bool) {
    let body = serde_json::to_vec_pretty(&json!({ "error": error })).expect("JSON");
    (status, Bytes::from(body), false)
}

fn stripe_error(status: StatusCode, error: Value) -> Response {
    let (status, body, _) = error_answer(status, error);
    let mut response = (status, body).into_response();
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    response
}

/// Records a request and returns what was recorded.
fn record(
    shared: &Shared,
    method: Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Recorded {
    let body = String::from_utf8_lossy(body).into_owned();
    let recorded = Recorded {
        method,
        path: uri.path().to_owned(),
        headers: headers.clone(),
        form: serde_urlencoded::from_str(&body).unwrap_or_default(),
        body,
        received: Instant::now(),
    };
    shared.books().recorded.push(recorded.clone());
    recorded
}

async fn unknown_route(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&shared, method.clone(), &uri, &headers, &body);
    let error = json!({
        "type": "invalid_request_error",
        "message": format!("unrecognized request URL ({method}: {})", uri.path()),
    });
    with_request_id(stripe_error(StatusCode::NOT_FOUND, error))
}

fn with_request_id(mut response: Response) -> Response {
    let id = format!("req_{}", random_alphanumeric(14));
    let value = HeaderValue::from_str(&id).expect("ASCII");
    response.headers_mut().insert("request-id", value);
    response
}

fn random_alphanumeric(length: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    (0..length)
        .map(|_| char::from(ALPHABET[rand::random_range(0..ALPHABET.len())]))
        .collect()
}
