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

/// Pipes `stream` to stdout and stdin to `stream` until both directions end.
/// Returns the byte counts (received, sent).
pub async fn run(stream: ReachStream, stdin: &mut Stdin) -> anyhow::Result<(u64, u64)> {
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
    Ok((received, sent))
}
