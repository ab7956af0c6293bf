//! The `federation` scenario: N hubs in a topology, M nodes spread over them,
//! run in virtual time until every hub routes to every other and resolves
//! every node; then, optionally, crash a share of the hubs, restart them, and
//! measure how long until every node is reachable again; and cut the
//! federation in two, heal it, and measure the same.
//!
//! Convergence is checked every [`CHECK`] of virtual time, cheaply by counts
//! first and then entry by entry; it is then confirmed by real Lookup frames
//! from random nodes for random targets, answered by the hubs.

use std::time::{Duration, Instant};

use reach_proto::SecretKey;

use crate::topology::{self, Shape};
use crate::world::{World, GOSSIP};
use reach_proto::rng::Rng;

/// How often convergence is checked.
pub const CHECK: Duration = Duration::from_millis(250);
/// Lookups sent to confirm convergence.
const LOOKUPS: usize = 200;

/// What to simulate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Params {
    /// Hubs.
    pub hubs: usize,
    /// Nodes in all, spread evenly over the hubs.
    pub nodes: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Hub graph.
    pub topology: Shape,
    /// Per-frame loss probability on every link (a lost frame is resent
    /// after an RTO, as TCP does).
    pub loss: f64,
    /// Nodes connect at random times within this window from the start.
    pub attach_window: Duration,
    /// Give up converging after this much virtual time.
    pub limit: Duration,
    /// Share of hubs to crash once converged (0: no faults).
    pub kill: f64,
    /// How long crashed hubs stay down.
    pub down: Duration,
    /// Once converged (and after the fault run, if any), cut the federation
    /// in two for this long, then heal it.
    pub partition: Option<Duration>,
}

/// The outcome, as `reach-sim federation` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// Hubs simulated.
    pub hubs: usize,
    /// Nodes simulated.
    pub nodes: usize,
    /// The seed.
    pub seed: u64,
    /// The hub graph.
    pub topology: Shape,
    /// Configured hub peerings.
    pub hub_links: usize,
    /// Whether every hub came to route to every other and resolve every node.
    pub converged: bool,
    /// Gossip intervals until then.
    pub rounds_to_converge: u64,
    /// Virtual time until then.
    pub virtual_ms_to_converge: u64,
    /// Frames sent until then (hub links and node sessions).
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames between hubs until then.
    pub hub_messages: u64,
    /// Their bytes.
    pub hub_bytes: u64,
    /// Largest route table, estimated in-memory bytes.
    pub max_route_bytes_per_hub: u64,
    /// Largest directory (with its node index), estimated in-memory bytes.
    pub max_directory_bytes_per_hub: u64,
    /// Largest directory, in entries.
    pub max_directory_entries_per_hub: u64,
    /// Lookups from random nodes for random targets once converged (each
    /// asks the target's home hub for its entry).
    pub lookups: Lookups,
    /// The fault run, if asked for.
    pub faults: Option<FaultReport>,
    /// The partition run, if asked for.
    pub partition: Option<PartitionReport>,
    /// What was still missing at the end, if it did not converge.
    pub shortfall: Option<Shortfall>,
    /// Peak resident memory of the simulator process.
    pub peak_rss_bytes: Option<u64>,
    /// Wall-clock time of the whole run.
    pub wall_ms: u64,
}

/// How the federation weathered crashed hubs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FaultReport {
    /// Hubs crashed.
    pub killed: usize,
    /// How long they stayed down.
    pub down_ms: u64,
    /// Whether the surviving hubs reconverged among themselves while the
    /// others were down (routes and the nodes of live hubs).
    pub survivors_reconverged: bool,
    /// Time from the crash until they had.
    pub survivors_ms: Option<u64>,
    /// Whether every node was reachable again after the restart.
    pub recovered: bool,
    /// Time from the restart until it was.
    pub recovery_ms: Option<u64>,
    /// What was still missing at the end, if it did not recover.
    pub shortfall: Option<Shortfall>,
}

/// How the federation weathered a cut in two.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PartitionReport {
    /// Hubs on the smaller side.
    pub cut_off: usize,
    /// Hub peerings across the cut.
    pub links_cut: usize,
    /// How long the cut lasted.
    pub cut_ms: u64,
    /// Whether each side reconverged on its own during the cut.
    pub sides_reconverged: bool,
    /// Time from the cut until they had.
    pub sides_ms: Option<u64>,
    /// Whether the whole federation reconverged after the heal.
    pub healed: bool,
    /// Time from the heal until it had.
    pub heal_ms: Option<u64>,
    /// What was still missing at the end, if it did not.
    pub shortfall: Option<Shortfall>,
}

/// Builds the world of `p`.
pub fn build(p: &Params) -> (World, usize) {
    let mut rng = Rng::new(p.seed);
    let mut topo_rng = rng.fork();
    let mut id_rng = rng.fork();
    let mut node_rng = rng.fork();
    let mut world = World::new(rng.fork(), p.loss);
    for _ in 0..p.hubs {
        world.add_hub(SecretKey::from_seed(id_rng.bytes32()));
    }
    let edges = topology::edges(p.topology, p.hubs, &mut topo_rng);
    for e in &edges {
        world.add_peering(e.dialer, e.listener, e.latency);
    }
    for n in 0..p.nodes {
        let hub = n % p.hubs.max(1);
        let after =
            Duration::from_micros(node_rng.below(p.attach_window.as_micros().max(1) as u64));
        let latency = Duration::from_micros(500 + node_rng.below(4500));
        world.add_node(SecretKey::from_seed(id_rng.bytes32()), hub, latency, after);
    }
    for h in 0..p.hubs {
        world.start_hub(h);
    }
    (world, edges.len())
}

/// Runs `p` to the end.
pub fn run(p: &Params) -> Report {
    let started = Instant::now();
    let (mut world, hub_links) = build(p);
    let converged_at = run_until_converged(&mut world, p.limit);
    let traffic = world.traffic;
    let (mut max_route, mut max_dir, mut max_entries) = (0u64, 0u64, 0u64);
    for h in &world.hubs {
        if let Some(core) = &h.core {
            let f = core.footprint();
            max_route = max_route.max(f.route_bytes as u64);
            max_dir = max_dir.max(f.directory_bytes as u64);
            max_entries = max_entries.max(f.directory_entries as u64);
        }
    }
    let lookups = if converged_at.is_some() {
        confirm_by_lookups(&mut world, &mut Rng::new(p.seed ^ 0x5eed))
    } else {
        Lookups::default()
    };
    let faults = (p.kill > 0.0 && converged_at.is_some())
        .then(|| faults(&mut world, p, &mut Rng::new(p.seed ^ 0xdead)));
    let partition = match (p.partition, converged_at) {
        (Some(cut), Some(_)) => Some(partition(&mut world, p, cut, &mut Rng::new(p.seed ^ 0xc07))),
        _ => None,
    };
    let at = converged_at.unwrap_or(p.limit);
    let short = converged_at.is_none().then(|| shortfall(&world));
    Report {
        hubs: p.hubs,
        nodes: p.nodes,
        seed: p.seed,
        topology: p.topology,
        hub_links,
        converged: converged_at.is_some(),
        rounds_to_converge: at.as_micros().div_ceil(GOSSIP.as_micros()) as u64,
        virtual_ms_to_converge: at.as_millis() as u64,
        messages: traffic.messages(),
        bytes: traffic.bytes(),
        hub_messages: traffic.hub_messages,
        hub_bytes: traffic.hub_bytes,
        max_route_bytes_per_hub: max_route,
        max_directory_bytes_per_hub: max_dir,
        max_directory_entries_per_hub: max_entries,
        lookups,
        faults,
        partition,
        shortfall: short,
        peak_rss_bytes: peak_rss(),
        wall_ms: started.elapsed().as_millis() as u64,
    }
}

/// Steps the world until [`converged`] holds or `limit` passes; returns
/// when it first held.
pub fn run_until_converged(world: &mut World, limit: Duration) -> Option<Duration> {
    let mut check = Check::default();
    loop {
        let next = world.now() + CHECK;
        world.run_until(next);
        if check.converged(world) {
            return Some(world.now());
        }
        if world.now() >= limit {
            return None;
        }
    }
}

/// Whether every running hub routes to every other running hub it is
/// connected to and resolves every node homed at one of those to its home,
/// and every node of a running hub is registered. (With crashed hubs the
/// federation may be cut in parts; each part must converge on its own.)
pub fn converged(world: &World) -> bool {
    Check::default().converged(world)
}

/// Repeated convergence checks: each starts with the hub that failed the
/// last one, as it most likely still does (a full check of a thousand hubs
/// is a hundred million lookups; a failing one should stop at the first).
#[derive(Default)]
struct Check {
    first: usize,
}

impl Check {
    fn converged(&mut self, world: &World) -> bool {
        if world
            .nodes
            .iter()
            .any(|n| world.hub_alive(n.hub) && !n.registered())
        {
            return false;
        }
        let sizes = Sizes::of(world);
        let n = world.hubs.len();
        let order = (0..n).map(|i| (self.first + i) % n);
        // Counts first for every hub: cheap, and short for most of the run.
        for h in order.clone() {
            if !sizes.counts_match(world, h) {
                self.first = h;
                return false;
            }
        }
        for h in order {
            if sizes.missing(world, h, true) != (0, 0) {
                self.first = h;
                return false;
            }
        }
        true
    }
}

/// The parts the running hubs form, and hubs and nodes per part.
struct Sizes {
    parts: Vec<Option<usize>>,
    hubs_in: Vec<usize>,
    nodes_in: Vec<usize>,
}

impl Sizes {
    fn of(world: &World) -> Self {
        let parts = world.components();
        let mut hubs_in = vec![0usize; world.hubs.len()];
        let mut nodes_in = vec![0usize; world.hubs.len()];
        for p in parts.iter().flatten() {
            hubs_in[*p] += 1;
        }
        for n in &world.nodes {
            if let Some(p) = parts[n.hub] {
                nodes_in[p] += 1;
            }
        }
        Self {
            parts,
            hubs_in,
            nodes_in,
        }
    }

    /// Whether hub `h` (if it runs) holds at least as many routes and
    /// directory entries as its part needs.
    fn counts_match(&self, world: &World, h: usize) -> bool {
        let (Some(core), Some(part)) = (&world.hubs[h].core, self.parts[h]) else {
            return true;
        };
        let f = core.footprint();
        f.routes + 1 >= self.hubs_in[part] && f.directory_entries >= self.nodes_in[part]
    }

    /// Routes and node resolutions hub `h` lacks within its part (with
    /// `stop_early`, 0 or 1).
    fn missing(&self, world: &World, h: usize, stop_early: bool) -> (usize, usize) {
        let (Some(core), Some(part)) = (&world.hubs[h].core, self.parts[h]) else {
            return (0, 0);
        };
        let peers = (0..world.hubs.len()).filter(|o| self.parts[*o] == Some(part));
        let mut missing = peers.filter(|o| !core.routes_to(&world.hubs[*o].id));
        let routes = if stop_early {
            usize::from(missing.next().is_some())
        } else {
            missing.count()
        };
        if stop_early && routes > 0 {
            return (routes, 0);
        }
        let nodes = world
            .nodes
            .iter()
            .filter(|n| self.parts[n.hub] == Some(part));
        let mut wrong = nodes.filter(|n| core.home_of(&n.id) != Some(world.hubs[n.hub].id));
        let nodes = if stop_early {
            usize::from(wrong.next().is_some())
        } else {
            wrong.count()
        };
        (routes, nodes)
    }
}

/// What keeps the world from [`converged`], in numbers, for a report that
/// says why it did not converge.
pub fn shortfall(world: &World) -> Shortfall {
    let sizes = Sizes::of(world);
    let mut out = Shortfall {
        nodes_unregistered: world
            .nodes
            .iter()
            .filter(|n| world.hub_alive(n.hub) && !n.registered())
            .count(),
        ..Shortfall::default()
    };
    for h in 0..world.hubs.len() {
        let (routes, nodes) = sizes.missing(world, h, false);
        out.missing_routes += routes;
        out.unresolved_nodes += nodes;
    }
    out
}

/// See [`shortfall`].
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Shortfall {
    /// Nodes of running hubs not registered.
    pub nodes_unregistered: usize,
    /// (hub, hub) pairs of running hubs without a route.
    pub missing_routes: usize,
    /// (hub, node) pairs where the hub does not resolve a node of a running
    /// hub to that hub.
    pub unresolved_nodes: usize,
}

/// Sends [`LOOKUPS`] lookups from random registered nodes for random nodes,
/// waits up to [`LOOKUP_WAIT`] for the answers, and counts those naming the
/// right home hub, with the answers' round trips.
fn confirm_by_lookups(world: &mut World, rng: &mut Rng) -> Lookups {
    let n = world.nodes.len() as u64;
    let mut out = Lookups::default();
    if n == 0 {
        return out;
    }
    let mut sent = Vec::new();
    let start = world.now();
    for _ in 0..LOOKUPS {
        let from = rng.below(n) as usize;
        let target = rng.below(n) as usize;
        let (tid, home) = (
            world.nodes[target].id,
            world.hubs[world.nodes[target].hub].id,
        );
        if let Some(req) = world.lookup(from, tid) {
            sent.push((from, req, home));
        }
    }
    let answered = |w: &World| {
        sent.iter()
            .all(|(f, req, _)| w.nodes[*f].found.contains_key(req))
    };
    while !answered(world) && world.now() < start + LOOKUP_WAIT {
        let next = world.now() + Duration::from_millis(100);
        world.run_until(next);
    }
    let mut times: Vec<u64> = Vec::new();
    for (from, req, home) in &sent {
        if let Some((found, at)) = world.nodes[*from].found.get(req) {
            if *found == Some(*home) {
                out.ok += 1;
                times.push((*at - start).as_millis() as u64);
            }
        }
    }
    times.sort_unstable();
    out.sent = sent.len();
    out.median_ms = times.get(times.len() / 2).copied();
    out.max_ms = times.last().copied();
    out
}

/// How long lookups may take: a Locate crosses the federation and back.
const LOOKUP_WAIT: Duration = Duration::from_secs(10);

/// Lookups sent once converged.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Lookups {
    /// Sent.
    pub sent: usize,
    /// Answered with the right home hub.
    pub ok: usize,
    /// Median round trip of those, virtual ms.
    pub median_ms: Option<u64>,
    /// Slowest of those.
    pub max_ms: Option<u64>,
}

/// Crashes `p.kill` of the hubs five seconds after convergence, restarts
/// them `p.down` later, and times both recoveries.
fn faults(world: &mut World, p: &Params, rng: &mut Rng) -> FaultReport {
    let count = ((p.hubs as f64 * p.kill).ceil() as usize).min(p.hubs.saturating_sub(1));
    let mut victims: Vec<usize> = (0..p.hubs).collect();
    for i in 0..victims.len() {
        let j = i + rng.below((victims.len() - i) as u64) as usize;
        victims.swap(i, j);
    }
    victims.truncate(count);
    let settle = world.now() + Duration::from_secs(5);
    world.run_until(settle);
    let crash = world.now();
    for v in &victims {
        world.kill_hub(*v);
    }
    let restart_at = crash + p.down;
    let survivors_ms = first_converged(world, crash, restart_at);
    for v in &victims {
        world.start_hub(*v);
    }
    let limit = world.now() + p.limit;
    let recovered = run_until_converged(world, limit);
    FaultReport {
        killed: count,
        down_ms: p.down.as_millis() as u64,
        survivors_reconverged: survivors_ms.is_some(),
        survivors_ms,
        recovered: recovered.is_some(),
        recovery_ms: recovered.map(|t| (t - restart_at).as_millis() as u64),
        shortfall: recovered.is_none().then(|| shortfall(world)),
    }
}

/// Cuts the federation in two for `cut` (five seconds after convergence):
/// one side is the hubs a walk over the peerings from a random hub reaches
/// first, half of them, as a site or region falls off a WAN. Times each
/// side's reconvergence and the whole federation's after the heal.
fn partition(world: &mut World, p: &Params, cut: Duration, rng: &mut Rng) -> PartitionReport {
    let n = world.hubs.len();
    let mut neighbours = vec![Vec::new(); n];
    for (a, h) in world.hubs.iter().enumerate() {
        for &(b, _) in h.peers() {
            neighbours[a].push(b);
            neighbours[b].push(a);
        }
    }
    let mut side = vec![false; n];
    let mut queue = std::collections::VecDeque::from([rng.below(n as u64) as usize]);
    let mut taken = 0;
    while let Some(h) = queue.pop_front() {
        if side[h] || taken >= n / 2 {
            continue;
        }
        side[h] = true;
        taken += 1;
        queue.extend(neighbours[h].iter().copied().filter(|&b| !side[b]));
    }
    let links_cut = world
        .hubs
        .iter()
        .enumerate()
        .flat_map(|(a, h)| h.peers().iter().map(move |&(b, _)| (a, b)))
        .filter(|&(a, b)| side[a] != side[b])
        .count();
    world.run_until(world.now() + Duration::from_secs(5));
    let cut_at = world.now();
    world.partition(side);
    let heal_at = cut_at + cut;
    let sides_ms = first_converged(world, cut_at, heal_at);
    world.heal();
    let limit = world.now() + p.limit;
    let healed = run_until_converged(world, limit);
    PartitionReport {
        cut_off: taken.min(n - taken),
        links_cut,
        cut_ms: cut.as_millis() as u64,
        sides_reconverged: sides_ms.is_some(),
        sides_ms,
        healed: healed.is_some(),
        heal_ms: healed.map(|t| (t - heal_at).as_millis() as u64),
        shortfall: healed.is_none().then(|| shortfall(world)),
    }
}

/// Runs the world until `until` (whatever happens meanwhile); returns how
/// long after `since` it first was [`converged`], if it was.
fn first_converged(world: &mut World, since: Duration, until: Duration) -> Option<u64> {
    let mut first = None;
    while world.now() < until {
        let next = (world.now() + CHECK).min(until);
        world.run_until(next);
        if first.is_none() && converged(world) {
            first = Some((world.now() - since).as_millis() as u64);
        }
    }
    first
}

/// Peak resident set size of this process (Linux `VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
