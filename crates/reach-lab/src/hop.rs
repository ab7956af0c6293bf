//! A userspace hop on a lab link: it adds delay, jitter and loss
//! ([`crate::impair`]; this kernel has no `netem`) and, for NAT sites whose behaviour the kernel cannot produce, runs the
//! userspace NAT of [`crate::nat`]. It copies Ethernet frames between two TAP
//! devices, holding each for the configured time.
//!
//! ```text
//!  ns A: veth ──── b0 [ x0 + t0 ] ══ hop (delay, NAT) ══ [ t1 + x1 ] b1 ──── veth :ns B
//!  (internet)      (bridge)          (this process)            (bridge)      (site)
//! ```
//! Being a layer-2 relay, the hop is invisible to addressing and ARP; with a
//! NAT it rewrites only IPv4 TCP and UDP packets to or from the site. Each
//! direction has a reader thread that timestamps (and translates) frames and a
//! writer thread that sends them when due, so frames keep their order and their
//! spacing. Accuracy: the writer sleeps until each frame is due; Linux wakes a
//! sleeping thread within about 0.1 ms here, so a configured delay is met to
//! within a fraction of a millisecond unless the machine is saturated. A
//! bounded queue (drop-tail at the TAP when full) keeps memory bounded.

use std::io::Write;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tun_rs::{DeviceBuilder, Layer, SyncDevice};

use crate::impair::{ImpairConfig, Impairment};
use crate::nat::{Nat, NatConfig, Verdict};

/// Frames queued per direction before the reader blocks.
const QUEUE_FRAMES: usize = 8192;
/// Largest frame read (MTU 1500 plus Ethernet header, with slack).
const FRAME: usize = 2048;
/// Ethernet header length; the lab's frames carry no VLAN tags.
const ETH: usize = 14;

/// Which way frames cross a NAT hop.
#[derive(Clone, Copy)]
enum Direction {
    /// From the site (the `b` device) to the internet.
    Outbound,
    /// From the internet (the `a` device) to the site.
    Inbound,
}

fn open(name: &str) -> std::io::Result<Arc<SyncDevice>> {
    let dev = DeviceBuilder::new()
        .name(name)
        .layer(Layer::L2)
        .packet_information(false)
        .mtu(1500)
        .build_sync()?;
    Ok(Arc::new(dev))
}

/// Where a frame goes after the NAT saw it.
enum Route {
    /// On to the other side.
    On,
    /// Back to the side it came from (hairpinning).
    Back,
    /// Nowhere.
    Drop,
}

/// The NAT's clock starts with the hop.
static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Applies the NAT to an IPv4 frame; other frames (ARP) pass unchanged.
fn translate(nat: &Mutex<Nat>, dir: Direction, frame: &mut [u8]) -> Route {
    if frame.len() <= ETH || frame[12..14] != [0x08, 0x00] {
        return Route::On;
    }
    let now = EPOCH.get_or_init(Instant::now).elapsed();
    let mut nat = nat.lock().unwrap_or_else(|p| p.into_inner());
    let verdict = match dir {
        Direction::Outbound => nat.outbound(now, &mut frame[ETH..]),
        Direction::Inbound => nat.inbound(now, &mut frame[ETH..]),
    };
    match verdict {
        Verdict::Forward => Route::On,
        Verdict::Drop(_) => Route::Drop,
        Verdict::Hairpin => {
            // Back to the gateway as if from the next router: swap the MACs.
            let (dst, src) = frame.split_at_mut(6);
            dst.swap_with_slice(&mut src[..6]);
            Route::Back
        }
    }
}

type Queue = SyncSender<(Instant, Vec<u8>)>;

/// A thread that writes queued frames to `to` when they are due.
fn writer(to: Arc<SyncDevice>) -> Queue {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE_FRAMES);
    std::thread::spawn(move || {
        for (due, frame) in rx {
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let _ = to.send(&frame);
        }
    });
    tx
}

/// A thread that reads frames from `from`, translates them, and queues them
/// for the other side when the link's impairment says (after its delay and
/// jitter, unless it loses them), or, hairpinned, straight back: that never
/// crosses the link.
fn reader(
    from: Arc<SyncDevice>,
    mut link: Impairment,
    nat: Option<(Arc<Mutex<Nat>>, Direction)>,
    on: Queue,
    back: Queue,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; FRAME];
        while let Ok(n) = from.recv(&mut buf) {
            let route = match &nat {
                Some((nat, dir)) => translate(nat, *dir, &mut buf[..n]),
                None => Route::On,
            };
            let sent = match route {
                Route::On => match link.admit(Instant::now()) {
                    Some(due) => on.send((due, buf[..n].to_vec())),
                    None => Ok(()),
                },
                Route::Back => back.send((Instant::now(), buf[..n].to_vec())),
                Route::Drop => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
    })
}

/// Opens TAP devices `a` (internet side) and `b` (site side), says `ready` on
/// stdout, and relays frames between them with `delay` and `impair` each way
/// (each direction draws from its own seed), translating them with a
/// userspace NAT when `nat` is given, until killed.
pub fn run(
    a: &str,
    b: &str,
    delay: Duration,
    impair: ImpairConfig,
    nat: Option<NatConfig>,
) -> std::io::Result<()> {
    let (ta, tb) = (open(a)?, open(b)?);
    println!("ready");
    std::io::stdout().flush()?;
    let nat = nat.map(|c| Arc::new(Mutex::new(Nat::new(c))));
    let with = |dir| nat.clone().map(|n| (n, dir));
    let (to_a, to_b) = (writer(ta.clone()), writer(tb.clone()));
    let outward = ImpairConfig {
        seed: impair.seed ^ 0x9e37_79b9_7f4a_7c15,
        ..impair
    };
    let inbound = reader(
        ta,
        Impairment::new(delay, impair),
        with(Direction::Inbound),
        to_b.clone(),
        to_a.clone(),
    );
    let outbound = reader(
        tb,
        Impairment::new(delay, outward),
        with(Direction::Outbound),
        to_a,
        to_b,
    );
    let _ = inbound.join();
    let _ = outbound.join();
    Ok(())
}
