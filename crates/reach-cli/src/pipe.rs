//! netcat-style piping between a stream and stdin/stdout.
//!
//! ```text
//! stdin --reader task--> channel --> stream write half (shutdown on stdin EOF)
//! stream read half --> stdout
//! ```
//! stdin is read by one task for the life of the process, so with `listen --keep`
//! successive connections share it: each gets what is read while it is the
//! current one, and once stdin ends every later connection is half-closed at once.

use anyhow::Context;
use reach::ReachStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const CHUNK: usize = 64 * 1024;

/// A handle on stdin's chunks.
pub struct Stdin {
    rx: mpsc::Receiver<Vec<u8>>,
    ended: bool,
}

/// Starts the stdin reader task.
pub fn stdin() -> Stdin {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        loop {
            let mut buf = vec![0u8; CHUNK];
            match stdin.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.send(buf).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("reading stdin failed: {e}");
                    break;
                }
            }
        }
    });
    Stdin { rx, ended: false }
}

/// What one piped stream did.
pub struct Done {
    /// Bytes received.
    pub received: u64,
    /// Bytes sent.
    pub sent: u64,
    /// When piping started.
    pub started: std::time::Instant,
    /// When piping ended.
    pub ended: std::time::Instant,
    /// The stream, for what it knows about itself (an upgrade).
    pub stream: ReachStream,
}

impl Done {
    /// Logs the byte counts and, for a stream that moved off its hub, where
    /// it moved and the send rate on each path.
    pub fn log(&self) {
        let Done { received, sent, .. } = *self;
        let mbit = |bytes: u64, from: std::time::Instant, to: std::time::Instant| {
            let secs = to.saturating_duration_since(from).as_secs_f64();
            if secs > 0.0 {
                format!("{:.0}", bytes as f64 * 8.0 / secs / 1e6)
            } else {
                "-".into()
            }
        };
        // The busier direction's rate over the whole piping time.
        let mbit_s = mbit(sent.max(received), self.started, self.ended);
        let Some(u) = self.stream.upgraded() else {
            tracing::info!(received, sent, %mbit_s, "stream done");
            return;
        };
        let routed = u.sent_routed.unwrap_or(sent);
        let moved_at = u.at.max(self.started);
        tracing::info!(
            received,
            sent,
            %mbit_s,
            upgraded = %u.module,
            to = %u.remote_addr,
            sent_routed = routed,
            routed_mbit_s = %mbit(routed, self.started, moved_at),
            upgraded_mbit_s = %mbit(sent - routed, moved_at, self.ended),
            "stream done"
        );
    }
}

/// Pipes `stream` to stdout and stdin to `stream` until both directions end.
pub async fn run(stream: ReachStream, stdin: &mut Stdin) -> anyhow::Result<Done> {
    let started = std::time::Instant::now();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let upload = async {
        let mut sent = 0u64;
        while !stdin.ended {
            match stdin.rx.recv().await {
                Some(chunk) => {
                    wr.write_all(&chunk)
                        .await
                        .context("sending to peer failed")?;
                    sent += chunk.len() as u64;
                }
                None => stdin.ended = true,
            }
        }
        wr.shutdown().await.context("closing the stream failed")?;
        anyhow::Ok(sent)
    };
    let download = async {
        let mut stdout = tokio::io::stdout();
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0u64;
        loop {
            let n = rd
                .read(&mut buf)
                .await
                .context("receiving from peer failed")?;
            if n == 0 {
                break;
            }
            stdout
                .write_all(&buf[..n])
                .await
                .context("writing stdout failed")?;
            // What arrived is shown now, not when a line or a buffer fills:
            // interactive use and programs that wait for a reply need that.
            stdout.flush().await.context("writing stdout failed")?;
            received += n as u64;
        }
        anyhow::Ok(received)
    };
    let (sent, received) = tokio::try_join!(upload, download)?;
    Ok(Done {
        received,
        sent,
        started,
        ended: std::time::Instant::now(),
        stream: rd.unsplit(wr),
    })
}
