//! The gateway's request logic, without sockets: a batch of NAT-PMP and
//! PCP datagrams in, answers out, the table, the journal and the kernel
//! changed in DPF's order on the way.
//!
//! ```text
//! add:    table -> journal (synced) -> kernel -> answer
//! delete: table -> kernel -> journal -> answer
//! ```
//!
//! A batch's kernel changes go in one nftables transaction. When it
//! fails, the batch's new mappings are taken out of the table again (and
//! the journal says so) and their requests are answered with the
//! protocols' network-failure codes: nothing is half-applied.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::journal::{Entry, Journal, JournalError};
use crate::natpmp;
use crate::nft::NftError;
use crate::pcp;
use crate::table::{in_prefix, Change, Key, MapRequest, Mapping, Protocol, Refusal, Source, Table};
use crate::upnp;
use reach_proto::gateway_query;

/// Where the mappings' rules go (the kernel's nftables, or a fake in
/// unit tests).
pub trait Rules {
    /// Adds the rules of `add` and deletes those of `delete`, all or none.
    fn change(&mut self, add: &[Mapping], delete: &[Mapping]) -> Result<(), NftError>;
}

impl Rules for crate::nft::Kernel {
    fn change(&mut self, add: &[Mapping], delete: &[Mapping]) -> Result<(), NftError> {
        match crate::nft::Kernel::change(self, add, delete) {
            Ok(()) => Ok(()),
            // The table changed under the daemon (by hand): read it again
            // and try once more against what it holds.
            Err(e) => {
                tracing::debug!("nft batch failed ({e}); the table is read again");
                self.refresh()?;
                crate::nft::Kernel::change(self, add, delete)
            }
        }
    }
}

/// Counters of the service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Requests read (both protocols).
    pub requests: u64,
    /// Mappings added.
    pub added: u64,
    /// Mappings renewed.
    pub renewed: u64,
    /// Mappings deleted on request.
    pub deleted: u64,
    /// Mappings whose lease ended.
    pub expired: u64,
    /// Mappings of clients that were gone (DPF's probe).
    pub gone: u64,
    /// Requests refused by the policy (answered with the protocol's code).
    pub refused: u64,
    /// Datagrams that were not requests (dropped, or answered with an
    /// error code as the protocol asks).
    pub malformed: u64,
    /// Datagrams from outside the allowed internal ranges (dropped).
    pub outsiders: u64,
    /// Kernel transactions that failed.
    pub kernel_failures: u64,
    /// Same-network queries answered (DPF's query).
    pub queries: u64,
}

/// Why a change to the durable state failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The journal could not be written: the gateway must stop, as it
    /// can no longer keep its promise across a crash.
    #[error("{0}")]
    Journal(#[from] JournalError),
}

/// One answer to send.
pub type Reply = (Vec<u8>, SocketAddr);

/// The gateway's state.
pub struct Service<R: Rules> {
    table: Table,
    journal: Journal,
    rules: R,
    /// The external address (None: the WAN has none now).
    external: Option<Ipv4Addr>,
    /// When the service started (seconds since the Unix epoch): PCP and
    /// NAT-PMP epochs count from it.
    started: u64,
    /// Its counters.
    pub counters: Counters,
}

/// A request's answer, depending on whether the kernel took the batch.
struct Pending {
    to: SocketAddr,
    ok: Vec<u8>,
    failed: Vec<u8>,
    added: Option<Mapping>,
}

impl<R: Rules> Service<R> {
    /// A service over `table` (restored already), `journal` and `rules`.
    pub fn new(
        table: Table,
        journal: Journal,
        rules: R,
        external: Option<Ipv4Addr>,
        now: u64,
    ) -> Self {
        Self {
            table,
            journal,
            rules,
            external,
            started: now,
            counters: Counters::default(),
        }
    }

    /// The table.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// Sets the external address (the WAN's changed).
    pub fn set_external(&mut self, external: Option<Ipv4Addr>) {
        self.external = external;
    }

    fn epoch(&self, now: u64) -> u32 {
        u32::try_from(now.saturating_sub(self.started)).unwrap_or(u32::MAX)
    }

    /// Serves a batch of datagrams received at `now`; returns the answers.
    pub fn serve(
        &mut self,
        batch: &[(Vec<u8>, SocketAddr)],
        now: u64,
    ) -> Result<Vec<Reply>, ServiceError> {
        let mut changes = Vec::new();
        let mut replies = Vec::new();
        for (data, from) in batch {
            let SocketAddr::V4(from4) = from else {
                self.counters.outsiders += 1;
                continue;
            };
            if !self.admits(*from4.ip()) {
                tracing::debug!(%from, "request from outside the allowed ranges dropped");
                continue;
            }
            self.counters.requests += 1;
            let outcome = match data.first() {
                Some(&natpmp::VERSION) => self.natpmp(data, *from4, now),
                _ => self.pcp(data, *from4, now),
            };
            match outcome {
                Outcome::Drop => self.counters.malformed += 1,
                Outcome::Now(b) => replies.push((b, *from)),
                Outcome::Change { change, ok, failed } => changes.push((change, ok, failed, *from)),
            }
        }
        replies.extend(self.commit(changes, now)?);
        Ok(replies)
    }

    /// Whether requests from `ip` are served (it is inside the allowed
    /// internal ranges); counts an outsider.
    pub fn admits(&mut self, ip: Ipv4Addr) -> bool {
        let inside = self
            .table
            .policy()
            .internal
            .iter()
            .any(|p| in_prefix(ip, *p));
        if !inside {
            self.counters.outsiders += 1;
        }
        inside
    }

    /// Serves a UPnP control request from `client` (admitted already);
    /// returns the whole HTTP response.
    pub fn soap(
        &mut self,
        req: &upnp::Request,
        client: Ipv4Addr,
        now: u64,
    ) -> Result<Vec<u8>, ServiceError> {
        self.counters.requests += 1;
        let outcome = self.upnp(req, client, now);
        let from = SocketAddr::from((client, 0));
        Ok(match outcome {
            Outcome::Drop => {
                self.counters.malformed += 1;
                upnp::fault(upnp::code::INVALID_ACTION, "Invalid Action").into_bytes()
            }
            Outcome::Now(b) => b,
            Outcome::Change { change, ok, failed } => self
                .commit(vec![(change, ok, failed, from)], now)?
                .pop()
                .map(|r| r.0)
                .unwrap_or_default(),
        })
    }

    /// Applies changes in DPF's order and returns their answers: the
    /// `ok` ones if the kernel took them, else the `failed` ones (and the
    /// additions undone).
    fn commit(
        &mut self,
        changes: Vec<(Done, Vec<u8>, Vec<u8>, SocketAddr)>,
        now: u64,
    ) -> Result<Vec<Reply>, ServiceError> {
        let mut pending = Vec::new();
        let mut journal_adds = Vec::new();
        let mut kernel_adds = Vec::new();
        let mut kernel_dels = Vec::new();
        let mut replies = Vec::new();
        for (change, ok, failed, to) in changes {
            let added = match change {
                Done::Added(m) => {
                    journal_adds.push(Entry::Add(m));
                    kernel_adds.push(m);
                    Some(m)
                }
                Done::Renewed(m) => {
                    // The kernel has it already: answered once journaled.
                    self.counters.renewed += 1;
                    journal_adds.push(Entry::Add(m));
                    replies.push((ok, to));
                    continue;
                }
                Done::Deleted(ms) => {
                    kernel_dels.extend(ms);
                    None
                }
            };
            pending.push(Pending {
                to,
                ok,
                failed,
                added,
            });
        }
        // DPF's order: what is added is journaled before the kernel has
        // it; what is deleted leaves the kernel before the journal.
        self.journal.append(&journal_adds)?;
        let kernel = if kernel_adds.is_empty() && kernel_dels.is_empty() {
            Ok(())
        } else {
            self.rules.change(&kernel_adds, &kernel_dels)
        };
        match kernel {
            Ok(()) => {
                self.counters.added += kernel_adds.len() as u64;
                self.counters.deleted += kernel_dels.len() as u64;
                let dels: Vec<Entry> = kernel_dels
                    .iter()
                    .map(|m| Entry::Del((m.protocol, m.external_port)))
                    .collect();
                self.journal.append(&dels)?;
                for m in &kernel_adds {
                    tracing::info!(protocol = %m.protocol, external_port = m.external_port, internal = %m.internal, client = %m.client, source = ?m.source, "mapping added");
                }
                for m in &kernel_dels {
                    tracing::info!(protocol = %m.protocol, external_port = m.external_port, internal = %m.internal, "mapping deleted");
                }
                replies.extend(pending.into_iter().map(|p| (p.ok, p.to)));
            }
            Err(e) => {
                self.counters.kernel_failures += 1;
                tracing::error!("the kernel refused a batch of {} additions and {} deletions: {e}; the additions are undone", kernel_adds.len(), kernel_dels.len());
                // The additions are undone; the deletions are put back
                // (their rules are still in the kernel).
                let mut undo = Vec::new();
                for p in &pending {
                    if let Some(m) = p.added {
                        self.table.remove((m.protocol, m.external_port));
                        undo.push(Entry::Del((m.protocol, m.external_port)));
                    }
                }
                for m in &kernel_dels {
                    self.table.restore(*m, now);
                }
                self.journal.append(&undo)?;
                replies.extend(pending.into_iter().map(|p| (p.failed, p.to)));
            }
        }
        Ok(replies)
    }

    /// Ends the leases due by `now`: table, kernel, journal.
    pub fn expire(&mut self, now: u64) -> Result<usize, ServiceError> {
        let keys = self.table.expired(now);
        let n = self.delete(&keys, "mapping expired")?;
        self.counters.expired += n as u64;
        Ok(n)
    }

    /// Deletes the mappings of clients the probe found gone: table,
    /// kernel, journal.
    pub fn drop_gone(&mut self, keys: &[Key]) -> Result<usize, ServiceError> {
        let n = self.delete(keys, "mapping deleted: its client is gone (probe)")?;
        self.counters.gone += n as u64;
        Ok(n)
    }

    /// Deletes `keys` in DPF's order (table, kernel, journal), logging
    /// `why` for each; compacts the journal when it has grown.
    fn delete(&mut self, keys: &[Key], why: &str) -> Result<usize, ServiceError> {
        let gone: Vec<Mapping> = keys.iter().filter_map(|k| self.table.remove(*k)).collect();
        if gone.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.rules.change(&[], &gone) {
            // Kept out of the table all the same: the next start's
            // reconciliation deletes rules the journal no longer has.
            self.counters.kernel_failures += 1;
            tracing::error!("cannot delete {} mappings' rules: {e}", gone.len());
        }
        let dels: Vec<Entry> = gone
            .iter()
            .map(|m| Entry::Del((m.protocol, m.external_port)))
            .collect();
        self.journal.append(&dels)?;
        for m in &gone {
            tracing::info!(protocol = %m.protocol, external_port = m.external_port, internal = %m.internal, "{why}");
        }
        if self.journal.appended() > 4 * self.table.len() + 1024 {
            let live: Vec<Mapping> = self.table.mappings().copied().collect();
            self.journal.compact(&live)?;
        }
        Ok(gone.len())
    }

    /// When the next lease ends.
    pub fn next_expiry(&self) -> Option<u64> {
        self.table.next_expiry()
    }

    fn natpmp(&mut self, data: &[u8], from: SocketAddrV4, now: u64) -> Outcome {
        let epoch = self.epoch(now);
        let req = match natpmp::Request::decode(data) {
            Ok(r) => r,
            Err(e) => {
                return match e.answer(epoch) {
                    Some(b) => {
                        self.counters.malformed += 1;
                        Outcome::Now(b)
                    }
                    None => Outcome::Drop,
                }
            }
        };
        let client = *from.ip();
        match req {
            natpmp::Request::ExternalAddress => Outcome::Now(match self.external {
                Some(a) => natpmp::external_address_response(natpmp::ResultCode::Success, epoch, a),
                None => natpmp::external_address_response(
                    natpmp::ResultCode::NetworkFailure,
                    epoch,
                    Ipv4Addr::UNSPECIFIED,
                ),
            }),
            natpmp::Request::Map {
                protocol,
                internal_port,
                suggested_port,
                lifetime,
            } => {
                let answer = |code, ext, life| {
                    natpmp::map_response(protocol, code, epoch, internal_port, ext, life)
                };
                if lifetime == 0 {
                    let gone = if internal_port == 0 {
                        let keys = self.table.of_client(protocol, client);
                        keys.into_iter()
                            .filter_map(|k| self.table.remove(k))
                            .collect()
                    } else {
                        match self.table.unmap(
                            protocol,
                            client,
                            SocketAddrV4::new(client, internal_port),
                            None,
                        ) {
                            Ok(m) => m.into_iter().collect(),
                            Err(r) => return self.refused(r, answer(natpmp_code(r), 0, 0)),
                        }
                    };
                    return Outcome::Change {
                        change: Done::Deleted(gone),
                        ok: answer(natpmp::ResultCode::Success, 0, 0),
                        failed: answer(natpmp::ResultCode::NetworkFailure, 0, 0),
                    };
                }
                if self.external.is_none() {
                    return Outcome::Now(answer(natpmp::ResultCode::NetworkFailure, 0, 0));
                }
                let r = MapRequest {
                    protocol,
                    client,
                    internal: SocketAddrV4::new(client, internal_port),
                    suggested_port,
                    exact: false,
                    lifetime,
                    source: Source::NatPmp,
                    nonce: None,
                };
                match self.table.map(&r, now) {
                    Ok(c) => {
                        let m = c.mapping();
                        let life = u32::try_from(m.expires.saturating_sub(now)).unwrap_or(u32::MAX);
                        Outcome::Change {
                            change: c.into(),
                            ok: answer(natpmp::ResultCode::Success, m.external_port, life),
                            failed: answer(natpmp::ResultCode::NetworkFailure, 0, 0),
                        }
                    }
                    Err(e) => self.refused(e, answer(natpmp_code(e), 0, 0)),
                }
            }
        }
    }

    fn pcp(&mut self, data: &[u8], from: SocketAddrV4, now: u64) -> Outcome {
        let epoch = self.epoch(now);
        if gateway_query::Query::is_query(data) {
            return self.query(data, from, now);
        }
        let req = match pcp::Request::decode(data) {
            Ok(r) => r,
            Err(e) => {
                return match e.answer(epoch) {
                    Some(b) => {
                        self.counters.malformed += 1;
                        Outcome::Now(b)
                    }
                    None => Outcome::Drop,
                }
            }
        };
        let refuse = |code| Outcome::Now(pcp::error_response(&req, code, epoch));
        if req.client != IpAddr::V4(*from.ip()) {
            return refuse(pcp::ResultCode::AddressMismatch);
        }
        if req.opcode != pcp::OP_MAP {
            // PEER would pin an outbound flow's NAT mapping; not served.
            return refuse(pcp::ResultCode::UnsupportedOpcode);
        }
        let Some(protocol) = Protocol::from_number(req.map.protocol) else {
            return refuse(pcp::ResultCode::UnsupportedProtocol);
        };
        let client = *from.ip();
        let internal = SocketAddrV4::new(client, req.map.internal_port);
        if req.lifetime == 0 {
            return match self
                .table
                .unmap(protocol, client, internal, Some(req.map.nonce))
            {
                Ok(gone) => {
                    let given = pcp::MapData {
                        external_port: gone.map_or(0, |m| m.external_port),
                        ..req.map
                    };
                    Outcome::Change {
                        change: Done::Deleted(gone.into_iter().collect()),
                        ok: pcp::response(&req, given, 0, epoch),
                        failed: pcp::error_response(&req, pcp::ResultCode::NetworkFailure, epoch),
                    }
                }
                Err(e) => self.refused(e, pcp::error_response(&req, pcp_code(e), epoch)),
            };
        }
        let Some(external) = self.external else {
            return refuse(pcp::ResultCode::NetworkFailure);
        };
        if req.map.internal_port == 0 {
            return refuse(pcp::ResultCode::MalformedRequest);
        }
        let r = MapRequest {
            protocol,
            client,
            internal,
            suggested_port: req.map.external_port,
            exact: false,
            lifetime: req.lifetime,
            source: Source::Pcp,
            nonce: Some(req.map.nonce),
        };
        match self.table.map(&r, now) {
            Ok(c) => {
                let m = c.mapping();
                let life = u32::try_from(m.expires.saturating_sub(now)).unwrap_or(u32::MAX);
                let given = pcp::MapData {
                    external_port: m.external_port,
                    external_addr: IpAddr::V4(external),
                    ..req.map
                };
                Outcome::Change {
                    change: c.into(),
                    ok: pcp::response(&req, given, life, epoch),
                    failed: pcp::error_response(&req, pcp::ResultCode::NetworkFailure, epoch),
                }
            }
            Err(e) => self.refused(e, pcp::error_response(&req, pcp_code(e), epoch)),
        }
    }

    /// DPF's same-network query: which internal endpoint a public one of
    /// this gateway forwards to. Answered from the table alone; a client
    /// learns no more than the LAN's own hosts would by scanning it.
    fn query(&mut self, data: &[u8], from: SocketAddrV4, now: u64) -> Outcome {
        let Ok(query) = gateway_query::Query::decode(data) else {
            // Opcode data the length of nothing: PCP's malformed answer.
            let opcode = gateway_query::OPCODE;
            let e = pcp::RequestError::Refused {
                code: pcp::ResultCode::MalformedRequest,
                opcode,
                data: Vec::new(),
            };
            self.counters.malformed += 1;
            return e
                .answer(self.epoch(now))
                .map_or(Outcome::Drop, Outcome::Now);
        };
        let mut answer = gateway_query::Answer {
            result: pcp::ResultCode::Success as u8,
            lifetime: 0,
            epoch: self.epoch(now),
            query,
            internal: None,
        };
        if query.client != IpAddr::V4(*from.ip()) {
            answer.result = pcp::ResultCode::AddressMismatch as u8;
            return Outcome::Now(answer.encode());
        }
        let Some(protocol) = Protocol::from_number(query.protocol) else {
            answer.result = pcp::ResultCode::UnsupportedProtocol as u8;
            return Outcome::Now(answer.encode());
        };
        self.counters.queries += 1;
        let ours = self.external.map(IpAddr::V4) == Some(query.external.ip());
        if let Some(m) = ours
            .then(|| self.table.get((protocol, query.external.port())))
            .flatten()
        {
            answer.internal = Some(SocketAddr::V4(m.internal));
            answer.lifetime = u32::try_from(m.expires.saturating_sub(now)).unwrap_or(u32::MAX);
        }
        tracing::debug!(client = %from, external = %query.external, internal = ?answer.internal, "same-network query answered");
        Outcome::Now(answer.encode())
    }

    fn upnp(&mut self, req: &upnp::Request, client: Ipv4Addr, now: u64) -> Outcome {
        let Some((service, action)) = req.soap_action.as_deref().and_then(|a| a.split_once('#'))
        else {
            return Outcome::Drop;
        };
        let fault = |code, what: &str| Outcome::Now(upnp::fault(code, what).into_bytes());
        let ok =
            |args: &[(&str, String)]| upnp::action_response(service, action, args).into_bytes();
        let arg = |name| upnp::arg(&req.body, name);
        let protocol = || match arg("NewProtocol")
            .as_deref()
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            Some("TCP") => Some(Protocol::Tcp),
            Some("UDP") => Some(Protocol::Udp),
            _ => None,
        };
        let port = |name| arg(name).and_then(|p| p.trim().parse::<u16>().ok());
        let external = self.external.map(|a| a.to_string()).unwrap_or_default();
        let entry = |m: &Mapping| -> Vec<(&str, String)> {
            vec![
                ("NewRemoteHost", String::new()),
                ("NewExternalPort", m.external_port.to_string()),
                ("NewProtocol", m.protocol.name().to_ascii_uppercase()),
                ("NewInternalPort", m.internal.port().to_string()),
                ("NewInternalClient", m.internal.ip().to_string()),
                ("NewEnabled", "1".into()),
                (
                    "NewPortMappingDescription",
                    format!("{:?}", m.source).to_ascii_lowercase(),
                ),
                (
                    "NewLeaseDuration",
                    m.expires.saturating_sub(now).to_string(),
                ),
            ]
        };
        match action {
            "GetExternalIPAddress" => Outcome::Now(ok(&[("NewExternalIPAddress", external)])),
            "GetStatusInfo" => Outcome::Now(ok(&[
                (
                    "NewConnectionStatus",
                    if self.external.is_some() {
                        "Connected"
                    } else {
                        "Disconnected"
                    }
                    .into(),
                ),
                ("NewLastConnectionError", "ERROR_NONE".into()),
                ("NewUptime", now.saturating_sub(self.started).to_string()),
            ])),
            "GetConnectionTypeInfo" => Outcome::Now(ok(&[
                ("NewConnectionType", "IP_Routed".into()),
                ("NewPossibleConnectionTypes", "IP_Routed".into()),
            ])),
            "GetCommonLinkProperties" => Outcome::Now(ok(&[
                ("NewWANAccessType", "Ethernet".into()),
                ("NewLayer1UpstreamMaxBitRate", "1000000000".into()),
                ("NewLayer1DownstreamMaxBitRate", "1000000000".into()),
                (
                    "NewPhysicalLinkStatus",
                    if self.external.is_some() {
                        "Up"
                    } else {
                        "Down"
                    }
                    .into(),
                ),
            ])),
            "GetSpecificPortMappingEntry" => {
                let (Some(p), Some(ext)) = (protocol(), port("NewExternalPort")) else {
                    return fault(upnp::code::INVALID_ARGS, "Invalid Args");
                };
                match self.table.get((p, ext)) {
                    Some(m) => Outcome::Now(ok(&entry(m)[3..])),
                    None => fault(upnp::code::NO_SUCH_ENTRY, "NoSuchEntryInArray"),
                }
            }
            "GetGenericPortMappingEntry" => {
                let Some(i) =
                    arg("NewPortMappingIndex").and_then(|i| i.trim().parse::<usize>().ok())
                else {
                    return fault(upnp::code::INVALID_ARGS, "Invalid Args");
                };
                match self.table.mappings().nth(i) {
                    Some(m) => Outcome::Now(ok(&entry(m))),
                    None => fault(
                        upnp::code::ARRAY_INDEX_INVALID,
                        "SpecifiedArrayIndexInvalid",
                    ),
                }
            }
            "AddPortMapping" => {
                let (Some(p), Some(ext), Some(int)) =
                    (protocol(), port("NewExternalPort"), port("NewInternalPort"))
                else {
                    return fault(upnp::code::INVALID_ARGS, "Invalid Args");
                };
                let Some(internal) =
                    arg("NewInternalClient").and_then(|c| c.trim().parse::<Ipv4Addr>().ok())
                else {
                    return fault(upnp::code::INVALID_ARGS, "Invalid Args");
                };
                if !arg("NewRemoteHost").unwrap_or_default().trim().is_empty() {
                    return fault(
                        upnp::code::REMOTE_HOST_WILDCARD_ONLY,
                        "RemoteHostOnlySupportsWildcard",
                    );
                }
                if ext == 0 {
                    return fault(
                        upnp::code::WILDCARD_EXTERNAL_PORT,
                        "WildCardNotPermittedInExtPort",
                    );
                }
                if self.external.is_none() {
                    return fault(
                        upnp::code::ACTION_FAILED,
                        "Action Failed: no external address",
                    );
                }
                // IGD:1 reads a lease of 0 as "for ever": the policy's
                // longest lease here.
                let lease = port_lease(arg("NewLeaseDuration").as_deref());
                let r = MapRequest {
                    protocol: p,
                    client,
                    internal: SocketAddrV4::new(internal, int),
                    suggested_port: ext,
                    exact: true,
                    lifetime: if lease == 0 { u32::MAX } else { lease },
                    source: Source::Upnp,
                    nonce: None,
                };
                match self.table.map(&r, now) {
                    Ok(c) => Outcome::Change {
                        change: c.into(),
                        ok: ok(&[]),
                        failed: upnp::fault(upnp::code::ACTION_FAILED, "Action Failed")
                            .into_bytes(),
                    },
                    Err(e) => {
                        let (code, what) = upnp_code(e);
                        self.refused(e, upnp::fault(code, what).into_bytes())
                    }
                }
            }
            "DeletePortMapping" => {
                let (Some(p), Some(ext)) = (protocol(), port("NewExternalPort")) else {
                    return fault(upnp::code::INVALID_ARGS, "Invalid Args");
                };
                match self.table.unmap_external((p, ext), client) {
                    Ok(Some(m)) => Outcome::Change {
                        change: Done::Deleted(vec![m]),
                        ok: ok(&[]),
                        failed: upnp::fault(upnp::code::ACTION_FAILED, "Action Failed")
                            .into_bytes(),
                    },
                    Ok(None) => fault(upnp::code::NO_SUCH_ENTRY, "NoSuchEntryInArray"),
                    Err(e) => {
                        let (code, what) = upnp_code(e);
                        self.refused(e, upnp::fault(code, what).into_bytes())
                    }
                }
            }
            _ => fault(upnp::code::INVALID_ACTION, "Invalid Action"),
        }
    }

    fn refused(&mut self, why: Refusal, answer: Vec<u8>) -> Outcome {
        self.counters.refused += 1;
        tracing::info!("request refused: {why}");
        Outcome::Now(answer)
    }
}

/// What one request comes to.
enum Outcome {
    /// Nothing to answer.
    Drop,
    /// An answer now (no state changed).
    Now(Vec<u8>),
    /// A change, answered `ok` once the kernel has it, else `failed`.
    Change {
        change: Done,
        ok: Vec<u8>,
        failed: Vec<u8>,
    },
}

enum Done {
    Added(Mapping),
    Renewed(Mapping),
    Deleted(Vec<Mapping>),
}

impl From<Change> for Done {
    fn from(c: Change) -> Self {
        match c {
            Change::Added(m) => Done::Added(m),
            Change::Renewed(m) => Done::Renewed(m),
        }
    }
}

/// NAT-PMP's code for a refusal.
fn natpmp_code(r: Refusal) -> natpmp::ResultCode {
    match r {
        Refusal::OverQuota { .. } | Refusal::NoPorts => natpmp::ResultCode::OutOfResources,
        _ => natpmp::ResultCode::NotAuthorized,
    }
}

/// A UPnP lease in seconds (absent or unreadable: 0, "for ever").
fn port_lease(text: Option<&str>) -> u32 {
    text.and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// UPnP's code and name for a refusal.
fn upnp_code(r: Refusal) -> (u16, &'static str) {
    match r {
        Refusal::PortTaken(_) => (upnp::code::CONFLICT, "ConflictInMappingEntry"),
        Refusal::OverQuota { .. } | Refusal::NoPorts => {
            (upnp::code::NO_PORT_MAPS_AVAILABLE, "NoPortMapsAvailable")
        }
        Refusal::NoInternalPort => (upnp::code::INVALID_ARGS, "Invalid Args"),
        Refusal::PortOutsideRange(_) | Refusal::InternalNotAllowed(_) | Refusal::WrongNonce => {
            (upnp::code::NOT_AUTHORIZED, "Action not authorized")
        }
    }
}

/// PCP's code for a refusal.
fn pcp_code(r: Refusal) -> pcp::ResultCode {
    match r {
        Refusal::OverQuota { .. } => pcp::ResultCode::UserExceededQuota,
        Refusal::NoPorts => pcp::ResultCode::NoResources,
        Refusal::PortTaken(_) | Refusal::PortOutsideRange(_) => {
            pcp::ResultCode::CannotProvideExternal
        }
        Refusal::NoInternalPort => pcp::ResultCode::MalformedRequest,
        Refusal::InternalNotAllowed(_) | Refusal::WrongNonce => pcp::ResultCode::NotAuthorized,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::Policy;

    /// The kernel's table as a set of mappings, failing on demand.
    #[derive(Default)]
    struct FakeRules {
        held: Vec<Mapping>,
        fail: bool,
    }

    impl Rules for FakeRules {
        fn change(&mut self, add: &[Mapping], delete: &[Mapping]) -> Result<(), NftError> {
            if self.fail {
                return Err(NftError::Failed("refused".into()));
            }
            // The kernel knows a mapping by its external port, not its
            // lease.
            self.held.retain(|m| {
                !delete
                    .iter()
                    .any(|d| (d.protocol, d.external_port) == (m.protocol, m.external_port))
            });
            self.held.extend_from_slice(add);
            Ok(())
        }
    }

    fn service(dir: &std::path::Path) -> Service<FakeRules> {
        let (journal, _) = Journal::open(&dir.join("j")).unwrap();
        let table = Table::new(Policy {
            internal: vec![("10.0.0.0".parse().unwrap(), 24)],
            ports: 40000..=40099,
            max_per_client: 2,
            lease_max: 3600,
            max_total: 100,
        });
        Service::new(
            table,
            journal,
            FakeRules::default(),
            Some("192.0.2.1".parse().unwrap()),
            1000,
        )
    }

    const CLIENT: &str = "10.0.0.5:5350";

    fn natpmp_map(port: u16, lifetime: u32) -> Vec<u8> {
        natpmp::Request::Map {
            protocol: Protocol::Tcp,
            internal_port: port,
            suggested_port: port,
            lifetime,
        }
        .encode()
    }

    /// A PCP MAP request from [`CLIENT`]'s address.
    fn pcp_map(
        protocol: u8,
        port: u16,
        suggested: u16,
        lifetime: u32,
        nonce: [u8; 12],
    ) -> pcp::Request {
        pcp::Request {
            opcode: pcp::OP_MAP,
            lifetime,
            client: "10.0.0.5".parse().unwrap(),
            map: pcp::MapData {
                nonce,
                protocol,
                internal_port: port,
                external_port: suggested,
                external_addr: "0.0.0.0".parse().unwrap(),
            },
            peer: None,
        }
    }

    fn one(s: &mut Service<FakeRules>, data: Vec<u8>, from: &str, now: u64) -> Vec<u8> {
        let mut r = s.serve(&[(data, from.parse().unwrap())], now).unwrap();
        assert_eq!(r.len(), 1, "{r:?}");
        r.remove(0).0
    }

    #[test]
    fn natpmp_maps_renews_and_deletes_through_table_journal_and_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = service(dir.path());
        let a = one(
            &mut s,
            natpmp::Request::ExternalAddress.encode(),
            CLIENT,
            1001,
        );
        assert_eq!(
            a,
            natpmp::external_address_response(
                natpmp::ResultCode::Success,
                1,
                "192.0.2.1".parse().unwrap()
            )
        );
        let r = one(&mut s, natpmp_map(40022, 7200), CLIENT, 1001);
        // Granted 3600 s (the cap), external port as suggested.
        assert_eq!(
            r,
            natpmp::map_response(
                Protocol::Tcp,
                natpmp::ResultCode::Success,
                1,
                40022,
                40022,
                3600
            )
        );
        assert_eq!(s.rules.held.len(), 1);
        let journal = std::fs::read_to_string(dir.path().join("j")).unwrap();
        assert!(journal.contains("40022"), "{journal}");
        // Renewed: same port, the kernel untouched.
        one(&mut s, natpmp_map(40022, 60), CLIENT, 1100);
        assert_eq!((s.counters.added, s.counters.renewed), (1, 1));
        assert_eq!(s.rules.held.len(), 1);
        assert_eq!(s.table().len(), 1);
        // Deleted.
        let d = one(&mut s, natpmp_map(40022, 0), CLIENT, 1200);
        assert_eq!(
            d,
            natpmp::map_response(Protocol::Tcp, natpmp::ResultCode::Success, 200, 40022, 0, 0)
        );
        assert!(s.rules.held.is_empty());
        assert!(s.table().is_empty());
    }

    #[test]
    fn refusals_carry_the_protocols_codes_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = service(dir.path());
        for port in [1, 2] {
            one(&mut s, natpmp_map(port, 60), CLIENT, 1000);
        }
        // Over the quota of 2: NAT-PMP's out of resources.
        let r = one(&mut s, natpmp_map(3, 60), CLIENT, 1000);
        assert_eq!(&r[2..4], &[0, 4]);
        // PCP: over quota is USER_EX_QUOTA.
        let req = pcp_map(6, 3, 0, 60, [9; 12]);
        let r = one(&mut s, req.encode(), CLIENT, 1000);
        assert_eq!(r[3], pcp::ResultCode::UserExceededQuota as u8);
        // PCP with a client address that is not the source.
        let lying = pcp::Request {
            client: "10.0.0.6".parse().unwrap(),
            ..req
        };
        let r = one(&mut s, lying.encode(), CLIENT, 1000);
        assert_eq!(r[3], pcp::ResultCode::AddressMismatch as u8);
        // UDP over PCP's protocol 0 (all): unsupported.
        let all = pcp::Request {
            map: pcp::MapData {
                protocol: 0,
                ..req.map
            },
            ..req
        };
        let r = one(&mut s, all.encode(), CLIENT, 1000);
        assert_eq!(r[3], pcp::ResultCode::UnsupportedProtocol as u8);
        // From outside the allowed ranges: dropped, counted.
        let r = s
            .serve(
                &[(natpmp_map(5, 60), "10.9.0.1:5350".parse().unwrap())],
                1000,
            )
            .unwrap();
        assert!(r.is_empty());
        assert_eq!(s.counters.outsiders, 1);
        assert_eq!(s.table().len(), 2);
        assert_eq!(s.rules.held.len(), 2);
    }

    #[test]
    fn a_batch_the_kernel_refuses_is_undone_and_answered_as_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = service(dir.path());
        s.rules.fail = true;
        let r = one(&mut s, natpmp_map(22, 60), CLIENT, 1000);
        assert_eq!(&r[2..4], &[0, natpmp::ResultCode::NetworkFailure as u8]);
        assert!(s.table().is_empty());
        assert_eq!(s.counters.kernel_failures, 1);
        // The journal, replayed, holds nothing either.
        drop(s);
        let (_, live) = Journal::open(&dir.path().join("j")).unwrap();
        assert!(live.is_empty(), "{live:?}");
    }

    fn soap(action: &str, args: &[(&str, &str)]) -> upnp::Request {
        let args: String = args
            .iter()
            .map(|(n, v)| format!("<{n}>{v}</{n}>"))
            .collect();
        upnp::Request {
            method: "POST".into(),
            path: upnp::CONTROL_IP.into(),
            soap_action: Some(format!("{}#{action}", upnp::WANIP)),
            body: format!(
                "<s:Envelope><s:Body><u:{action}>{args}</u:{action}></s:Body></s:Envelope>"
            ),
        }
    }

    #[test]
    fn upnp_adds_lists_and_deletes_and_refuses_with_its_codes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = service(dir.path());
        let me: Ipv4Addr = "10.0.0.5".parse().unwrap();
        let add = |client: &str, ext: &str| {
            soap(
                "AddPortMapping",
                &[
                    ("NewRemoteHost", ""),
                    ("NewExternalPort", ext),
                    ("NewProtocol", "TCP"),
                    ("NewInternalPort", "22"),
                    ("NewInternalClient", client),
                    ("NewEnabled", "1"),
                    ("NewPortMappingDescription", "ssh"),
                    ("NewLeaseDuration", "0"),
                ],
            )
        };
        // The whole HTTP answer to `req` from `who`.
        let ask = |s: &mut Service<FakeRules>, req: &upnp::Request, who: Ipv4Addr| {
            String::from_utf8(s.soap(req, who, 1000).unwrap()).unwrap()
        };
        let r = ask(&mut s, &add("10.0.0.5", "40022"), me);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert_eq!(s.rules.held.len(), 1);
        // A lease of 0 gets the longest the policy allows.
        assert_eq!(
            s.table().get((Protocol::Tcp, 40022)).map(|m| m.expires),
            Some(1000 + 3600)
        );
        let port_tcp = [("NewExternalPort", "40022"), ("NewProtocol", "TCP")];
        let r = ask(&mut s, &soap("GetSpecificPortMappingEntry", &port_tcp), me);
        assert!(
            r.contains("<NewInternalClient>10.0.0.5</NewInternalClient>"),
            "{r}"
        );
        let entry = |i| soap("GetGenericPortMappingEntry", &[("NewPortMappingIndex", i)]);
        let r = ask(&mut s, &entry("0"), me);
        assert!(
            r.contains("<NewExternalPort>40022</NewExternalPort>"),
            "{r}"
        );
        let r = ask(&mut s, &entry("1"), me);
        assert!(r.contains("<errorCode>713</errorCode>"), "{r}");
        // Another host may not take the port, nor map for someone else.
        let other: Ipv4Addr = "10.0.0.6".parse().unwrap();
        let r = ask(&mut s, &add("10.0.0.6", "40022"), other);
        assert!(r.contains("<errorCode>718</errorCode>"), "{r}");
        let r = ask(&mut s, &add("10.0.0.5", "40023"), other);
        assert!(r.contains("<errorCode>606</errorCode>"), "{r}");
        let del = soap(
            "DeletePortMapping",
            &[
                ("NewRemoteHost", ""),
                ("NewExternalPort", "40022"),
                ("NewProtocol", "TCP"),
            ],
        );
        let r = ask(&mut s, &del, other);
        assert!(r.contains("<errorCode>606</errorCode>"), "{r}");
        let r = ask(&mut s, &del, me);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(s.rules.held.is_empty());
        let r = ask(&mut s, &del, me);
        assert!(r.contains("<errorCode>714</errorCode>"), "{r}");
        let r = ask(&mut s, &soap("GetExternalIPAddress", &[]), me);
        assert!(
            r.contains("<NewExternalIPAddress>192.0.2.1</NewExternalIPAddress>"),
            "{r}"
        );
        let r = ask(&mut s, &soap("ForceTermination", &[]), me);
        assert!(r.contains("<errorCode>401</errorCode>"), "{r}");
    }

    #[test]
    fn pcp_maps_with_the_external_address_and_leases_expire() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = service(dir.path());
        let req = pcp_map(17, 5000, 40050, 30, [1; 12]);
        let r = one(&mut s, req.encode(), CLIENT, 1000);
        assert_eq!(r[3], 0);
        assert_eq!(u32::from_be_bytes([r[4], r[5], r[6], r[7]]), 30);
        // External port and address at their places in MAP's data.
        assert_eq!(u16::from_be_bytes([r[42], r[43]]), 40050);
        assert_eq!(&r[44 + 12..60], &[192, 0, 2, 1]);
        assert_eq!(s.next_expiry(), Some(1030));
        assert_eq!(s.expire(1029).unwrap(), 0);
        assert_eq!(s.expire(1030).unwrap(), 1);
        assert!(s.rules.held.is_empty());
        assert_eq!(s.counters.expired, 1);
    }

    #[test]
    fn the_same_network_query_names_a_mappings_internal_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = service(dir.path());
        let r = one(
            &mut s,
            pcp_map(6, 7000, 40007, 600, [2; 12]).encode(),
            CLIENT,
            1000,
        );
        assert_eq!(r[3], 0);
        let client: IpAddr = "10.0.0.9".parse().unwrap();
        let ask = |external: &str, protocol| gateway_query::Query {
            client,
            protocol,
            external: external.parse().unwrap(),
        };
        // Another LAN host asks about the public endpoint: 10.0.0.5:7000,
        // for the rest of the lease.
        let q = ask("192.0.2.1:40007", 6);
        let r = one(&mut s, q.encode(), "10.0.0.9:6000", 1100);
        let a = gateway_query::Answer::decode(&r, client).unwrap();
        assert_eq!(a.internal_for(&q), Some("10.0.0.5:7000".parse().unwrap()));
        assert_eq!(a.lifetime, 500);
        // Another port, another protocol, another address: not ours.
        for q in [
            ask("192.0.2.1:40008", 6),
            ask("192.0.2.1:40007", 17),
            ask("198.51.100.1:40007", 6),
        ] {
            let r = one(&mut s, q.encode(), "10.0.0.9:6000", 1100);
            let a = gateway_query::Answer::decode(&r, client).unwrap();
            assert_eq!((a.result, a.internal), (0, None), "{q:?}");
        }
        assert_eq!(s.counters.queries, 4);
        // A client field that is not the sender: ADDRESS_MISMATCH.
        let r = one(&mut s, q.encode(), "10.0.0.8:6000", 1100);
        assert_eq!(r[3], pcp::ResultCode::AddressMismatch as u8);
        // A query cut short: MALFORMED_REQUEST, counted.
        let mut cut = q.encode();
        cut.truncate(44);
        let r = one(&mut s, cut, "10.0.0.9:6000", 1100);
        assert_eq!(&r[..4], &[2, 0x80 | gateway_query::OPCODE, 0, 3]);
        assert_eq!(s.counters.malformed, 1);
        // Nothing changed.
        assert_eq!(s.table().len(), 1);
    }
}
