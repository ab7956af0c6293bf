//! A userspace link-delay hop: this kernel has no `netem`, so delay is added by
//! a process that copies Ethernet frames between two TAP devices, holding each
//! for the configured time.
//!
//! ```text
//!  ns A: veth ──── b0 [ x0 + t0 ] ══ hop (delay) ══ [ t1 + x1 ] b1 ──── veth :ns B
//!                  (bridge)          (this process)          (bridge)
//! ```
//! Being a layer-2 relay, the hop is invisible to addressing, ARP and the
//! gateways' conntrack. Each direction has a reader thread that timestamps
//! frames and a writer thread that sends them when due, so frames keep their
//! order and their spacing. Accuracy: the writer sleeps until each frame is due;
//! Linux wakes a sleeping thread within about 0.1 ms here, so a configured delay
//! is met to within a fraction of a millisecond unless the machine is saturated.
//! A bounded queue (drop-tail at the TAP when full) keeps memory bounded.

use std::io::Write;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tun_rs::{DeviceBuilder, Layer, SyncDevice};

/// Frames queued per direction before the reader blocks.
const QUEUE_FRAMES: usize = 8192;
/// Largest frame read (MTU 1500 plus Ethernet header, with slack).
const FRAME: usize = 2048;

fn open(name: &str) -> std::io::Result<Arc<SyncDevice>> {
    let dev = DeviceBuilder::new()
        .name(name)
        .layer(Layer::L2)
        .mtu(1500)
        .build_sync()?;
    Ok(Arc::new(dev))
}

fn relay(
    from: Arc<SyncDevice>,
    to: Arc<SyncDevice>,
    delay: Duration,
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
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
    })
}

/// Creates TAP devices `a` and `b`, says `ready` on stdout, and relays frames
/// between them with `delay` each way until killed.
pub fn run(a: &str, b: &str, delay: Duration) -> std::io::Result<()> {
    let (ta, tb) = (open(a)?, open(b)?);
    println!("ready");
    std::io::stdout().flush()?;
    let one = relay(ta.clone(), tb.clone(), delay);
    let other = relay(tb, ta, delay);
    let _ = one.join();
    let _ = other.join();
    Ok(())
}
