//! A rogue hub for the abuse suite. First, as an outsider, it asks to link
//! without the hub secret's proof: with none, with a proof made from
//! another secret, and with a node's admission proof made from the hub
//! secret itself (the labels differ, so it must not pass). Then, as an
//! insider that holds the federation's hub secret, it tries to take a route
//! and a node it does not own. It links to a real hub as a hub would, then:
//!
//! 1. advertises the victim hub at a newer state than the victim reached,
//!    passing on the victim's own chain element;
//! 2. sends an anchor for the victim hub that it signed itself;
//! 3. lists the victim node in its own (validly signed) directory, floods
//!    it again and again, and answers the hub's questions about the node
//!    with an entry it made up.
//!
//! Each attempt is printed as one JSON line (whether the hub refused or cut
//! the link);
//! the suite then checks from outside that the victim hub and node are
//! still reached the honest way. Only for labs: it sends nothing but to the
//! hub it is given.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use reach::{Endpoint, HubTarget, ReachStream};
use reach_proto::link::{
    admission_proof, decode_frame, encode_control, hub_link_proof, Control, DirEntry, Frame,
    HomeClaim,
};
use reach_proto::rng::Rng;
use reach_proto::route_chain::Chain;
use reach_proto::routes::Advert;
use reach_proto::{NodeId, SecretKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What to attack.
pub struct Params {
    /// The hub to link to (`NODEID@IP:PORT`).
    pub hub: HubTarget,
    /// The federation's hub secret.
    pub secret: Vec<u8>,
    /// A hub the target routes to, whose route the rogue tries to take.
    pub victim_hub: NodeId,
    /// A node of another hub, which the rogue tries to take.
    pub victim_node: NodeId,
    /// How long to keep claiming the node.
    pub hold: Duration,
    /// Seed of the rogue's key.
    pub seed: u64,
}

/// Bound on each wait for the hub.
const WAIT: Duration = Duration::from_secs(15);

/// Runs the attacks, printing one JSON line each.
pub fn run(p: &Params) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(attack(p))
}

async fn attack(p: &Params) -> anyhow::Result<()> {
    let key = SecretKey::from_seed(Rng::new(p.seed).bytes32());
    let me = key.node_id();
    let ep = Endpoint::builder().secret_key(key.clone()).bind().await?;
    let hub = p
        .hub
        .id
        .ok_or_else(|| anyhow!("the hub address must name its NodeId"))?;

    // 0: outsiders, refused before any gossip.
    let outsiders = [
        ("no credential", None),
        (
            "another secret",
            Some(hub_link_proof(b"not the hub secret", &me, &hub)),
        ),
        (
            "node proof from the hub secret",
            Some(admission_proof(&p.secret, &me, &hub)),
        ),
    ];
    for (attack, proof) in outsiders {
        match Link::hello(&ep, p, proof).await? {
            Ok(_) => println!(r#"{{"attack":"{attack}","refused":false}}"#),
            Err(reason) => println!(
                r#"{{"attack":"{attack}","refused":true,"reason":{}}}"#,
                serde_json::Value::from(reason)
            ),
        }
    }

    // 1: a newer state for the victim hub than it reached.
    let mut link = Link::open(&ep, p, &me, &hub).await?;
    let heard = link.advert_of(&p.victim_hub).await?;
    let newer = Advert {
        state: heard.state + 1,
        hops: 0,
        ..heard
    };
    link.send(&Control::Adverts {
        adverts: vec![newer],
    })
    .await?;
    report("newer route state", link.cut().await);

    // 2: an anchor for the victim hub, signed by the rogue.
    let mut link = Link::open(&ep, p, &me, &hub).await?;
    let mut anchor = Chain::new(&key, u64::MAX / 2).anchor().clone();
    anchor.origin = p.victim_hub;
    link.send(&Control::Anchors {
        anchors: vec![anchor],
    })
    .await?;
    report("forged route anchor", link.cut().await);

    // 3: the victim node listed in the rogue's own directory.
    let mut link = Link::open(&ep, p, &me, &hub).await?;
    let started = tokio::time::Instant::now();
    let (mut floods, mut answered) = (0u64, 0u64);
    let mut cut = false;
    while started.elapsed() < p.hold && !cut {
        floods += 1;
        let dir = Control::signed_directory(&key, floods, 0, 1, vec![p.victim_node], vec![]);
        link.send(&dir).await?;
        if floods == 2 {
            println!(r#"{{"attack":"claim node","progress":"flooded twice"}}"#);
        }
        // Answer what the hub asks about the node until the next flood.
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(got) = tokio::time::timeout_at(until, link.next()).await {
            match got {
                Ok(Control::Locate {
                    req, node, asker, ..
                }) => {
                    answered += 1;
                    let fake = DirEntry {
                        node,
                        hub: me,
                        addrs: vec![],
                        observed: "192.0.2.66:7000".parse()?,
                        claim: Some(Box::new(HomeClaim::new(&key, &me, u64::MAX))),
                    };
                    let located = Control::Located {
                        asker,
                        req,
                        node,
                        entry: Some(fake),
                    };
                    link.send(&located).await?;
                }
                Ok(_) => {}
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
    }
    println!(
        r#"{{"attack":"claim node","cut":{cut},"floods":{floods},"questions_answered":{answered}}}"#
    );
    Ok(())
}

fn report(attack: &str, cut: bool) {
    println!(r#"{{"attack":"{attack}","cut":{cut}}}"#);
}

/// A hub link the rogue speaks itself.
struct Link {
    stream: ReachStream,
    buf: Vec<u8>,
}

impl Link {
    /// Links to the hub with the hub secret's proof; returns once admitted.
    async fn open(ep: &Endpoint, p: &Params, me: &NodeId, hub: &NodeId) -> anyhow::Result<Self> {
        let proof = hub_link_proof(&p.secret, me, hub);
        Self::hello(ep, p, Some(proof))
            .await?
            .map_err(|reason| anyhow!("the hub refused the link: {reason}"))
    }

    /// Asks to link with `proof`: the link once admitted, or the hub's
    /// reason for refusing it (a link closed without one counts as refused,
    /// with that said).
    async fn hello(
        ep: &Endpoint,
        p: &Params,
        proof: Option<[u8; 32]>,
    ) -> anyhow::Result<Result<Self, String>> {
        let stream = ep.dial_hub(&p.hub).await.context("dialling the hub")?;
        let mut link = Self {
            stream,
            buf: Vec::new(),
        };
        let hello = Control::HubHello {
            addrs: vec![],
            proof,
        };
        link.send(&hello).await?;
        loop {
            match tokio::time::timeout(WAIT, link.next()).await {
                Ok(Ok(Control::HubHello { .. })) => return Ok(Ok(link)),
                Ok(Ok(Control::Refused { reason })) => return Ok(Err(reason)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Ok(Err(format!("closed without a reason: {e}"))),
                Err(_) => bail!("the hub did not answer the hello within {WAIT:?}"),
            }
        }
    }

    async fn send(&mut self, msg: &Control) -> anyhow::Result<()> {
        let mut f = Vec::new();
        encode_control(msg, &mut f)?;
        self.stream.write_all(&f).await?;
        Ok(())
    }

    /// The next control message (answering pings); an error once the link
    /// ends.
    async fn next(&mut self) -> anyhow::Result<Control> {
        loop {
            if let Some((frame, used)) = decode_frame(&self.buf)? {
                let msg = match frame {
                    Frame::Control(c) => Some(c),
                    _ => None,
                };
                self.buf.drain(..used);
                match msg {
                    Some(Control::Ping { nonce }) => self.send(&Control::Pong { nonce }).await?,
                    Some(c) => return Ok(c),
                    None => {}
                }
                continue;
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("the hub closed the link");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The hub's advert for `origin`, from its gossip.
    async fn advert_of(&mut self, origin: &NodeId) -> anyhow::Result<Advert> {
        let wait = async {
            loop {
                if let Control::Adverts { adverts } = self.next().await? {
                    if let Some(a) = adverts.iter().find(|a| a.origin == *origin) {
                        return Ok::<_, anyhow::Error>(*a);
                    }
                }
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .map_err(|_| anyhow!("the hub advertised no route to {origin} within {WAIT:?}"))?
    }

    /// Whether the hub cuts the link within the wait.
    async fn cut(&mut self) -> bool {
        let wait = async { while self.next().await.is_ok() {} };
        tokio::time::timeout(WAIT, wait).await.is_ok()
    }
}
