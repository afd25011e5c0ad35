//! The HTTP/1.1 side of the PXE server (RFC 9110, RFC 9112): iPXE fetches
//! its script, the kernel and the initramfs here, much faster than TFTP.
//!
//! One request per connection: GET or HEAD of `/<name>` (a query string is
//! ignored), answered with the whole file (`Range` is ignored, which a 200
//! allows), `Connection: close`, then the server closes. The module is
//! sans-IO: [`parse_head`] reads a request head strictly and [`respond`]
//! picks the response; the server reads the head (at most [`MAX_HEAD`]
//! bytes within [`HEAD_TIMEOUT`]) and writes what they return.
//!
//! | Request                                   | Status                          |
//! |-------------------------------------------|---------------------------------|
//! | GET/HEAD of a bundle file                 | 200, `Content-Length`, type     |
//! | GET/HEAD of anything else                 | 404                             |
//! | another method                            | 405 with `Allow: GET, HEAD`     |
//! | malformed request line or header          | 400                             |
//! | HTTP/2 or later on this text protocol     | 505                             |
//! | head longer than 8 KiB                    | 431                             |
//! | head not complete within 10 s             | 408                             |

use std::time::Duration;

use bytes::Bytes;

use crate::bundle::Bundle;

/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8192;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request head is longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("request head did not arrive within {HEAD_TIMEOUT:?}")]
    HeadTimeout,
    #[error("request line is not `METHOD SP target SP HTTP/x.y`")]
    RequestLine,
    #[error("request method is not a token")]
    Method,
    #[error("request target is neither origin-form, absolute-form nor '*'")]
    Target,
    #[error("protocol version {0:?} is not HTTP/1.0 or HTTP/1.1")]
    Version(String),
    #[error("header line {0} is not `name: value`")]
    Header(usize),
    #[error("HTTP/1.1 request without a Host header")]
    NoHost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other(String),
}

/// A request head that parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path without its leading '/' and without the query; `None` for
    /// the asterisk form.
    pub path: Option<String>,
}

/// Parses the request head at the start of `buf`. `Ok(None)`: the head is
/// not complete yet (no empty line) and more may be read.
pub fn parse_head(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_HEAD { Err(HttpError::HeadTooLarge) } else { Ok(None) };
    };
    if end + 4 > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let mut lines = crlf_lines(&buf[..end]);
    let line = lines.next().ok_or(HttpError::RequestLine)?;
    let (request, version) = parse_request_line(line)?;
    let mut host = false;
    for (i, line) in lines.enumerate() {
        let name = parse_header(line).ok_or(HttpError::Header(i + 1))?;
        host |= name.eq_ignore_ascii_case(b"host");
    }
    if version == (1, 1) && !host {
        return Err(HttpError::NoHost);
    }
    Ok(Some(request))
}

/// The lines of `head`, split at each "\r\n". A bare '\r' or '\n' stays
/// inside its line, where the line checks refuse it.
fn crlf_lines(mut head: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        match head.windows(2).position(|w| w == b"\r\n") {
            Some(at) => {
                let line = &head[..at];
                head = &head[at + 2..];
                Some(line)
            }
            None => {
                done = true;
                Some(head)
            }
        }
    })
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// The request and its protocol version (major, minor).
fn parse_request_line(line: &[u8]) -> Result<(Request, (u8, u8)), HttpError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::RequestLine);
    };
    if method.is_empty() || !method.iter().all(|&c| is_tchar(c)) {
        return Err(HttpError::Method);
    }
    let version = match version {
        [b'H', b'T', b'T', b'P', b'/', major @ b'0'..=b'9', b'.', minor @ b'0'..=b'9'] => {
            (major - b'0', minor - b'0')
        }
        _ => return Err(HttpError::RequestLine),
    };
    if version != (1, 0) && version != (1, 1) {
        return Err(HttpError::Version(String::from_utf8_lossy(&line[line.len() - 8..]).into_owned()));
    }
    if target.is_empty() || !target.iter().all(|&c| c.is_ascii_graphic()) {
        return Err(HttpError::Target);
    }
    let target = std::str::from_utf8(target).map_err(|_| HttpError::Target)?;
    let path = if target == "*" {
        None
    } else if target.starts_with('/') {
        Some(target)
    } else if target.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) {
        // Absolute form: the path follows the authority ("/" if none).
        let rest = &target[7..];
        Some(rest.find('/').map_or("/", |at| &rest[at..]))
    } else {
        return Err(HttpError::Target);
    };
    let path = path.map(|p| {
        let p = p.split_once('?').map_or(p, |(p, _query)| p);
        p[1..].to_owned()
    });
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        other => Method::Other(String::from_utf8_lossy(other).into_owned()),
    };
    Ok((Request { method, path }, version))
}

/// The header's name if `line` is `name: value` with a token name, no
/// whitespace before the colon, and no control characters in the value.
/// Obsolete line folding (a line starting with whitespace) is refused.
fn parse_header(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|&c| c == b':')?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    let name_ok = !name.is_empty() && name.iter().all(|&c| is_tchar(c));
    let value_ok = value.iter().all(|&c| c == b'\t' || c >= b' ' && c != 0x7f);
    (name_ok && value_ok).then_some(name)
}

/// A response: the head to write, then the body if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub head: Vec<u8>,
    pub body: Option<Bytes>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The response to a request head, or to the reason it was refused.
pub fn respond(request: Result<&Request, &HttpError>, bundle: &Bundle) -> Response {
    let req = match request {
        Ok(req) => req,
        Err(HttpError::HeadTooLarge) => return error(431, "Request Header Fields Too Large", false),
        Err(HttpError::HeadTimeout) => return error(408, "Request Timeout", false),
        Err(HttpError::Version(_)) => return error(505, "HTTP Version Not Supported", false),
        Err(_) => return error(400, "Bad Request", false),
    };
    let head_only = match req.method {
        Method::Get => false,
        Method::Head => true,
        Method::Other(_) => return error(405, "Method Not Allowed", false),
    };
    let Some(data) = req.path.as_deref().and_then(|name| bundle.get(name).map(|d| (name, d))) else {
        return error(404, "Not Found", head_only);
    };
    let (name, data) = data;
    let content_type = if name.ends_with(".ipxe") { "text/plain" } else { "application/octet-stream" };
    Response {
        status: 200,
        head: head(200, "OK", content_type, data.len(), ""),
        body: (!head_only).then(|| data.clone()),
    }
}

fn error(status: u16, reason: &'static str, head_only: bool) -> Response {
    let text = format!("{status} {reason}\n");
    let extra = if status == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    Response {
        status,
        head: head(status, reason, "text/plain", text.len(), extra),
        body: (!head_only).then(|| Bytes::from(text)),
    }
}

fn head(status: u16, reason: &str, content_type: &str, len: usize, extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nServer: nodeos\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n{extra}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bundle() -> Bundle {
        let mut b = Bundle::new();
        b.insert("boot.ipxe", Bytes::from_static(b"#!ipxe\nboot\n")).unwrap();
        b.insert("vmlinuz", Bytes::from_static(&[0u8; 1000])).unwrap();
        b
    }

    fn parse(s: &str) -> Result<Option<Request>, HttpError> {
        parse_head(s.as_bytes())
    }

    fn get(path: &str) -> Request {
        Request { method: Method::Get, path: Some(path.to_owned()) }
    }

    fn head_text(r: &Response) -> String {
        String::from_utf8(r.head.clone()).unwrap()
    }

    #[test]
    fn parses_requests() {
        assert_eq!(parse("GET /vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(Some(get("vmlinuz"))));
        assert_eq!(parse("GET /vmlinuz HTTP/1.0\r\n\r\n"), Ok(Some(get("vmlinuz"))));
        assert_eq!(parse("GET /boot.ipxe?mac=52:54 HTTP/1.0\r\n\r\n"), Ok(Some(get("boot.ipxe"))));
        assert_eq!(parse("GET http://10.0.0.5:7780/vmlinuz HTTP/1.0\r\n\r\n"), Ok(Some(get("vmlinuz"))));
        assert_eq!(parse("GET http://10.0.0.5 HTTP/1.0\r\n\r\n"), Ok(Some(get(""))));
        assert_eq!(
            parse("HEAD / HTTP/1.1\r\nHost: a\r\nUser-Agent: iPXE/1.21\r\nRange: bytes=0-\r\n\r\n"),
            Ok(Some(Request { method: Method::Head, path: Some(String::new()) }))
        );
        assert_eq!(
            parse("OPTIONS * HTTP/1.0\r\n\r\n"),
            Ok(Some(Request { method: Method::Other("OPTIONS".into()), path: None }))
        );
        // A body after the head is not our business.
        assert_eq!(parse("GET /vmlinuz HTTP/1.0\r\n\r\nbody"), Ok(Some(get("vmlinuz"))));
    }

    #[test]
    fn incomplete_heads_wait() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("GET /vmlinuz HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(parse_head(&vec![b'a'; MAX_HEAD - 1]), Ok(None));
    }

    #[test]
    fn refuses_malformed_heads() {
        assert_eq!(parse("GET /vmlinuz\r\n\r\n"), Err(HttpError::RequestLine));
        assert_eq!(parse("GET  /vmlinuz HTTP/1.0\r\n\r\n"), Err(HttpError::RequestLine));
        assert_eq!(parse("GET /vmlinuz HTTP/1.0 x\r\n\r\n"), Err(HttpError::RequestLine));
        assert_eq!(parse("GET /vmlinuz FTP/1.0\r\n\r\n"), Err(HttpError::RequestLine));
        assert_eq!(parse("G(T /vmlinuz HTTP/1.0\r\n\r\n"), Err(HttpError::Method));
        assert_eq!(parse("GET vmlinuz HTTP/1.0\r\n\r\n"), Err(HttpError::Target));
        assert_eq!(parse("GET /a\x01b HTTP/1.0\r\n\r\n"), Err(HttpError::Target));
        assert_eq!(parse("GET /vmlinuz HTTP/2.0\r\n\r\n"), Err(HttpError::Version("HTTP/2.0".into())));
        assert_eq!(parse("GET /vmlinuz HTTP/1.1\r\n\r\n"), Err(HttpError::NoHost));
        assert_eq!(parse("GET /vmlinuz HTTP/1.1\r\nHost : x\r\n\r\n"), Err(HttpError::Header(1)));
        assert_eq!(parse("GET /vmlinuz HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n"), Err(HttpError::Header(2)));
        assert_eq!(parse("GET /vmlinuz HTTP/1.1\r\nHost: x\nA: b\r\n\r\n"), Err(HttpError::Header(1)));
        assert_eq!(parse("GET /vmlinuz HTTP/1.1\r\nnocolon\r\n\r\n"), Err(HttpError::Header(1)));
        assert_eq!(parse("GET /vmlinuz HTTP/1.1\r\nHost: a\x00b\r\n\r\n"), Err(HttpError::Header(1)));
        assert_eq!(parse("\r\n\r\n"), Err(HttpError::RequestLine));
    }

    #[test]
    fn refuses_oversized_heads() {
        let mut big = b"GET /vmlinuz HTTP/1.0\r\nX: ".to_vec();
        big.resize(MAX_HEAD, b'a');
        assert_eq!(parse_head(&big), Err(HttpError::HeadTooLarge));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&big), Err(HttpError::HeadTooLarge));
        let mut fits = b"GET /vmlinuz HTTP/1.0\r\nX: ".to_vec();
        fits.resize(MAX_HEAD - 4, b'a');
        fits.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_head(&fits), Ok(Some(get("vmlinuz"))));
    }

    #[test]
    fn serves_files() {
        let b = bundle();
        let r = respond(Ok(&get("boot.ipxe")), &b);
        assert_eq!(r.status, 200);
        assert!(r.is_success());
        let h = head_text(&r);
        assert!(h.starts_with("HTTP/1.1 200 OK\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Type: text/plain\r\n"), "{h}");
        assert!(h.contains("\r\nContent-Length: 12\r\n"), "{h}");
        assert!(h.contains("\r\nConnection: close\r\n"), "{h}");
        assert!(h.ends_with("\r\n\r\n"));
        assert_eq!(r.body.as_deref(), Some(&b"#!ipxe\nboot\n"[..]));

        let r = respond(Ok(&get("vmlinuz")), &b);
        assert!(head_text(&r).contains("\r\nContent-Type: application/octet-stream\r\n"));
        assert_eq!(r.body.unwrap().len(), 1000);

        let r = respond(Ok(&Request { method: Method::Head, path: Some("vmlinuz".into()) }), &b);
        assert_eq!(r.status, 200);
        assert!(head_text(&r).contains("\r\nContent-Length: 1000\r\n"));
        assert_eq!(r.body, None);
    }

    #[test]
    fn error_statuses() {
        let b = bundle();
        for path in ["", "missing", "a/vmlinuz", "/vmlinuz", "..", "vmlinuz%00"] {
            assert_eq!(respond(Ok(&get(path)), &b).status, 404, "{path:?}");
        }
        let head = respond(Ok(&Request { method: Method::Head, path: Some("x".into()) }), &b);
        assert_eq!((head.status, head.body), (404, None));
        let post =
            respond(Ok(&Request { method: Method::Other("POST".into()), path: Some("vmlinuz".into()) }), &b);
        assert_eq!(post.status, 405);
        assert!(head_text(&post).contains("\r\nAllow: GET, HEAD\r\n"));
        assert_eq!(respond(Err(&HttpError::RequestLine), &b).status, 400);
        assert_eq!(respond(Err(&HttpError::NoHost), &b).status, 400);
        assert_eq!(respond(Err(&HttpError::HeadTooLarge), &b).status, 431);
        assert_eq!(respond(Err(&HttpError::HeadTimeout), &b).status, 408);
        let v = respond(Err(&HttpError::Version("HTTP/2.0".into())), &b);
        assert_eq!(v.status, 505);
        // Error bodies match their Content-Length.
        let body = v.body.unwrap();
        assert!(
            head_text(&respond(Err(&HttpError::Method), &b))
                .contains(&format!("Content-Length: {}\r\n", "400 Bad Request\n".len()))
        );
        assert_eq!(body.as_ref(), b"505 HTTP Version Not Supported\n");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let b = bundle();
            let parsed = parse_head(&bytes);
            if let Ok(Some(req)) = &parsed {
                let _ = respond(Ok(req), &b);
            }
            if let Err(e) = &parsed {
                let r = respond(Err(e), &b);
                prop_assert!(r.status >= 400);
            }
        }

        #[test]
        fn arbitrary_request_lines_never_panic(
            method in "[A-Z(]{0,8}",
            target in "[ -~]{0,40}",
            version in "[A-Z/0-9.]{0,10}",
            headers in proptest::collection::vec("[ -~\t]{0,30}", 0..4),
        ) {
            let mut s = format!("{method} {target} {version}\r\n");
            for h in headers {
                s.push_str(&h);
                s.push_str("\r\n");
            }
            s.push_str("\r\n");
            let _ = parse_head(s.as_bytes());
        }
    }
}
