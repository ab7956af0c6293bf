//! A userspace hop on a lab link: it adds delay (this kernel has no `netem`)
//! and, for NAT sites whose behaviour the kernel cannot produce, runs the
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
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tun_rs::{DeviceBuilder, Layer, SyncDevice};

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

/// Applies the NAT to an IPv4 frame; other frames (ARP) pass unchanged.
/// Returns whether the frame goes on.
fn translate(nat: &Mutex<Nat>, dir: Direction, frame: &mut [u8]) -> bool {
    if frame.len() <= ETH || frame[12..14] != [0x08, 0x00] {
        return true;
    }
    let mut nat = nat.lock().unwrap_or_else(|p| p.into_inner());
    let verdict = match dir {
        Direction::Outbound => nat.outbound(&mut frame[ETH..]),
        Direction::Inbound => nat.inbound(&mut frame[ETH..]),
    };
    verdict == Verdict::Forward
}

fn relay(
    from: Arc<SyncDevice>,
    to: Arc<SyncDevice>,
    delay: Duration,
    nat: Option<(Arc<Mutex<Nat>>, Direction)>,
) -> std::thread::JoinHandle<()> {
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
    std::thread::spawn(move || {
        let mut buf = [0u8; FRAME];
        while let Ok(n) = from.recv(&mut buf) {
            if let Some((nat, dir)) = &nat {
                if !translate(nat, *dir, &mut buf[..n]) {
                    continue;
                }
            }
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    })
}

/// Opens TAP devices `a` (internet side) and `b` (site side), says `ready` on
/// stdout, and relays frames between them with `delay` each way, translating
/// them with a userspace NAT when `nat` is given, until killed.
pub fn run(a: &str, b: &str, delay: Duration, nat: Option<NatConfig>) -> std::io::Result<()> {
    let (ta, tb) = (open(a)?, open(b)?);
    println!("ready");
    std::io::stdout().flush()?;
    let nat = nat.map(|c| Arc::new(Mutex::new(Nat::new(c))));
    let with = |dir| nat.clone().map(|n| (n, dir));
    let inbound = relay(ta.clone(), tb.clone(), delay, with(Direction::Inbound));
    let outbound = relay(tb, ta, delay, with(Direction::Outbound));
    let _ = inbound.join();
    let _ = outbound.join();
    Ok(())
}
