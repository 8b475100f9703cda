//! Which upstream a request goes to, decided on the normalised path.
//!
//! The path is normalised exactly once, before any route or limit is matched, and that same
//! normalised path is what the upstream receives. Spellings such as `/api//v1/./generate` or
//! `/api/v1/%67enerate` therefore cannot reach a route or skip a limit that the plain spelling
//! would not.

use std::sync::Arc;

use crate::config::RouteConfig;

/// Normalises a request path per RFC 3986: percent-encoded unreserved characters are decoded
/// (section 2.3), empty segments are dropped, and `.` and `..` segments are resolved (section
/// 5.2.4) without ever climbing above the root. Encoded reserved characters such as `%2F` stay
/// encoded, so they can never create a new segment. A trailing slash is kept.
pub fn normalise(path: &str) -> String {
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }

    let mut normalised = String::with_capacity(decoded.len());
    for segment in &segments {
        normalised.push('/');
        normalised.push_str(segment);
    }
    let names_a_directory =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    if normalised.is_empty() || (names_a_directory && !segments.is_empty()) {
        normalised.push('/');
    }
    normalised
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 3).filter(|_| bytes[i] == b'%');
        let Some(&[high, low]) = escape else {
            out.push(bytes[i]);
            i += 1;
            continue;
        };
        let (Some(high), Some(low)) = (hex_value(high), hex_value(low)) else {
            out.push(bytes[i]);
            i += 1;
            continue;
        };
        let byte = high << 4 | low;
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte);
        } else {
            out.extend_from_slice(format!("%{byte:02X}").as_bytes());
        }
        i += 3;
    }
    // Only ASCII was decoded, so the bytes are as valid UTF-8 as the input was.
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|value| value as u8)
}

/// The routes of one configuration, matched by longest prefix. Each is shared, so a request
/// keeps its route for its whole life without copying it.
pub struct Router {
    routes: Vec<Arc<RouteConfig>>,
}

impl Router {
    pub fn new(routes: Vec<RouteConfig>) -> Self {
        let mut routes: Vec<Arc<RouteConfig>> = routes.into_iter().map(Arc::new).collect();
        routes.sort_by_key(|route| std::cmp::Reverse(route.path_prefix.len()));
        Self { routes }
    }

    /// The route for a normalised path, if any prefix matches.
    pub fn route(&self, path: &str) -> Option<&Arc<RouteConfig>> {
        self.routes
            .iter()
            .find(|route| path.starts_with(&route.path_prefix))
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    #[test]
    fn dot_segments_and_doubled_slashes_collapse() {
        assert_eq!(normalise("/api//v1/./generate"), "/api/v1/generate");
        assert_eq!(normalise("/healthz/../api/v1/generate"), "/api/v1/generate");
        assert_eq!(
            normalise("/api/v1/stripe/webhook/../../generate"),
            "/api/v1/generate"
        );
        assert_eq!(normalise("/../../etc"), "/etc");
        assert_eq!(normalise(""), "/");
        assert_eq!(normalise("/"), "/");
        assert_eq!(normalise("/a/b/"), "/a/b/");
        assert_eq!(normalise("/a/b/.."), "/a/");
    }

    #[test]
    fn only_unreserved_escapes_are_decoded() {
        assert_eq!(
            normalise("/api/v1/stripe/%77ebhook"),
            "/api/v1/stripe/webhook"
        );
        assert_eq!(
            normalise("/api/v1/stripe/webhook%2F..%2F..%2Fgenerate"),
            "/api/v1/stripe/webhook%2F..%2F..%2Fgenerate"
        );
        assert_eq!(normalise("/a%2fb"), "/a%2Fb");
        assert_eq!(normalise("/%2e%2e/x"), "/x");
        assert_eq!(normalise("/bad%zz%"), "/bad%zz%");
        assert_eq!(normalise("/tail%4"), "/tail%4");
    }

    #[test]
    fn longest_prefix_wins() {
        let route = |name: &str, prefix: &str, port| RouteConfig {
            name: name.into(),
            path_prefix: prefix.into(),
            upstream_name: name.into(),
            upstream: SocketAddr::from(([127, 0, 0, 1], port)),
            cost: 1,
            max_body_bytes: 1024,
            cors: None,
        };
        let router = Router::new(vec![
            route("app", "/", 1),
            route("stripe", "/api/v1/stripe/", 2),
        ]);
        assert_eq!(
            router.route("/api/v1/stripe/webhook").unwrap().name,
            "stripe"
        );
        assert_eq!(router.route("/api/v1/stripe").unwrap().name, "app");
        assert_eq!(router.route("/api/v1/generate").unwrap().name, "app");
    }
}
