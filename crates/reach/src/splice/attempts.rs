//! The simultaneous open itself: connection attempts from one local port to
//! every candidate of the peer, as `reach_proto::punch::Punch` schedules
//! them, and a listener on the same port for SYNs that find no attempt.

use std::net::SocketAddr;
use std::time::Instant;

use reach_proto::nat::MAX_CANDIDATES;
use reach_proto::punch::{Punch, PunchStep};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::echo::reusable_socket;

/// Connects from `local` to every candidate until each either connects or
/// the deadline passes; established connections come out of the receiver.
pub(super) fn punch(
    local: SocketAddr,
    candidates: &[SocketAddr],
    deadline: Instant,
) -> (JoinSet<()>, mpsc::Receiver<TcpStream>) {
    let (tx, rx) = mpsc::channel(MAX_CANDIDATES);
    let mut tasks = JoinSet::new();
    // A listener on the same port takes a peer SYN that arrives while no
    // connecting socket waits for it (one was just reset by a rejecting
    // firewall): without it the kernel would answer with a reset, and two
    // sides that reset each other's SYNs could retry in lockstep forever.
    match reusable_socket(local).and_then(|s| s.listen(MAX_CANDIDATES as u32)) {
        Ok(listener) => {
            let tx = tx.clone();
            tasks.spawn(async move {
                let accept = async {
                    while let Ok((tcp, from)) = listener.accept().await {
                        tracing::trace!(%from, "splice SYN accepted");
                        let _ = tcp.set_nodelay(true);
                        if tx.send(tcp).await.is_err() {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout_at(deadline.into(), accept).await;
            });
        }
        Err(e) => tracing::debug!(%local, "no splice listener: {e}"),
    }
    let candidates: Vec<SocketAddr> = candidates.iter().take(MAX_CANDIDATES).copied().collect();
    tasks.spawn(drive_attempts(local, candidates, deadline, tx));
    (tasks, rx)
}

/// Runs the attempts `reach_proto::punch::Punch` schedules, sending each
/// connection that opens to `opened`, until the deadline.
async fn drive_attempts(
    local: SocketAddr,
    candidates: Vec<SocketAddr>,
    deadline: Instant,
    opened: mpsc::Sender<TcpStream>,
) {
    let mut schedule = Punch::new(&candidates, Instant::now(), deadline);
    let mut attempts = JoinSet::new();
    loop {
        let wake = loop {
            match schedule.poll(Instant::now()) {
                PunchStep::Connect(i, to) => match start_connect(local, to).await {
                    Ok(attempt) => {
                        attempts.spawn(async move { (i, attempt.await) });
                    }
                    Err(e) => {
                        tracing::trace!(%to, "splice SYN failed: {e}");
                        schedule.handle_failed(i, Instant::now());
                    }
                },
                PunchStep::Wait(t) => break t,
                PunchStep::Finished => return,
            }
        };
        tokio::select! {
            Some(done) = attempts.join_next() => match done {
                Ok((i, Ok(tcp))) => {
                    schedule.handle_connected(i);
                    let _ = tcp.set_nodelay(true);
                    if opened.send(tcp).await.is_err() {
                        return;
                    }
                }
                Ok((i, Err(e))) => {
                    tracing::trace!(candidate = i, "splice SYN failed: {e}");
                    schedule.handle_failed(i, Instant::now());
                }
                Err(_) => {}
            },
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
}

/// Sends the SYN of one attempt from `local` to `to` now, before returning,
/// so attempts leave in the order they are started; the future it returns
/// resolves when the attempt connects or fails.
async fn start_connect(
    local: SocketAddr,
    to: SocketAddr,
) -> std::io::Result<impl std::future::Future<Output = std::io::Result<TcpStream>> + Send> {
    let mut connecting = Box::pin(reusable_socket(local)?.connect(to));
    // The first poll makes the connect system call (and sends the SYN).
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(connecting.as_mut(), cx))
    })
    .await;
    Ok(async move {
        match first {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => connecting.await,
        }
    })
}
