//! A minimal HTTP endpoint for Prometheus scrapes (`/metrics`), a JSON
//! status (`/status`) and the dashboard (`/`, a page that polls `/status`
//! and draws the overlay; its files are part of the binary). One request
//! per connection, bounded in size and time: this is for a scraper and an
//! operator's browser on a management network, not a web server.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::status::Status;

const MAX_REQUEST: usize = 8 * 1024;

/// The dashboard's files: page, script, style.
const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves metrics on `listener` forever, taking a status snapshot per request.
pub async fn serve_metrics(
    listener: TcpListener,
    status: impl Fn() -> Status + Send + Sync + 'static,
) {
    let status = std::sync::Arc::new(status);
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let status = status.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(conn, || status())).await;
        });
    }
}

/// The path of an HTTP GET request line, if the head is complete.
fn request_path(head: &[u8]) -> Option<Result<&str, &'static str>> {
    let end = head.windows(4).position(|w| w == b"\r\n\r\n")?;
    let line = head[..end].split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok();
    let mut parts = line.map(|l| l.split_whitespace()).into_iter().flatten();
    Some(match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => Ok(path),
        _ => Err("405 Method Not Allowed"),
    })
}

async fn answer(mut conn: TcpStream, status: impl Fn() -> Status) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let path = loop {
        if let Some(p) = request_path(&head) {
            break p.map(str::to_string);
        }
        if head.len() > MAX_REQUEST {
            break Err("431 Request Header Fields Too Large");
        }
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    };
    use std::borrow::Cow;
    let (code, kind, body): (&str, &str, Cow<str>) = match path.as_deref() {
        Ok("/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            status().to_prometheus().into(),
        ),
        Ok("/status") => (
            "200 OK",
            "application/json",
            status().to_json(usize::MAX).to_string().into(),
        ),
        Ok("/" | "/index.html") => ("200 OK", "text/html; charset=utf-8", DASHBOARD_HTML.into()),
        Ok("/dashboard.js") => ("200 OK", "text/javascript", DASHBOARD_JS.into()),
        Ok("/dashboard.css") => ("200 OK", "text/css", DASHBOARD_CSS.into()),
        Ok(_) => (
            "404 Not Found",
            "text/plain",
            "try / (dashboard), /metrics or /status\n".into(),
        ),
        Err(code) => (*code, "text/plain", "".into()),
    };
    // The page loads only its own files: no inline script, nothing from
    // elsewhere, no framing.
    let reply = format!(
        "HTTP/1.1 {code}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\ncache-control: no-store\r\ncontent-security-policy: default-src 'self'; frame-ancestors 'none'\r\nx-content-type-options: nosniff\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(reply.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_parse() {
        assert_eq!(request_path(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            request_path(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Ok("/metrics"))
        );
        assert_eq!(
            request_path(b"POST / HTTP/1.1\r\n\r\n"),
            Some(Err("405 Method Not Allowed"))
        );
        assert_eq!(
            request_path(b"\xff\xfe\r\n\r\n"),
            Some(Err("405 Method Not Allowed"))
        );
    }
}
