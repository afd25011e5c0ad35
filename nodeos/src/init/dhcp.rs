//! A DHCPv4 client (RFC 2131, options from RFC 2132) for the management
//! address, sans-IO: [`Client`] takes the time and received datagrams and
//! answers with [`Action`]s (datagrams to send, a lease to apply or drop); the
//! caller owns the socket, the clock and the address configuration.
//!
//! States: `Init` → DISCOVER (broadcast) → `Selecting` until an OFFER →
//! REQUEST (broadcast) → `Requesting` until ACK (bound) or NAK/no answer
//! (back to `Init`) → `Bound` until T1 → `Renewing` (REQUEST unicast to the
//! server) until T2 → `Rebinding` (REQUEST broadcast) until the lease ends →
//! the address is dropped and discovery starts again. A NAK while renewing or
//! rebinding drops the address at once.
//!
//! DISCOVER is resent after 4, 8, 16, 32, then every 64 seconds, each with up
//! to a second of jitter, forever: a node with no network keeps asking. Every
//! request sets the BROADCAST flag, so servers broadcast their answers and a
//! plain UDP socket on port 68 hears them before the address is configured.
//!
//! Server messages are untrusted: every field is bounds-checked; a message
//! that is not an answer to this client's transaction, or whose options
//! cannot be read, is ignored. The message format is `nodeos_dhcp`'s.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nodeos_dhcp::{
    ACK, BOOTREPLY, BOOTREQUEST, BROADCAST_FLAG, DISCOVER, HTYPE_ETHERNET, Header, MessageBuilder, NAK,
    OFFER, OPT_CLIENT_ID, OPT_DNS, OPT_HOSTNAME, OPT_LEASE_TIME, OPT_MAX_SIZE, OPT_MESSAGE_TYPE,
    OPT_PARAMETERS, OPT_REBINDING_TIME, OPT_RENEWAL_TIME, OPT_REQUESTED_IP, OPT_ROUTER, OPT_SERVER_ID,
    OPT_SUBNET_MASK, Options, REQUEST,
};
pub use nodeos_dhcp::{CLIENT_PORT, SERVER_PORT};

/// Retransmission backoff of DISCOVER and REQUEST (RFC 2131 section 4.1).
const FIRST_RETRY: Duration = Duration::from_secs(4);
const MAX_RETRY: Duration = Duration::from_secs(64);
/// REQUESTs sent for one offer before discovery starts again.
const REQUEST_TRIES: u32 = 4;
/// Shortest wait between renewals (RFC 2131 section 4.4.5).
const MIN_RENEW_RETRY: Duration = Duration::from_secs(60);
/// Shortest lease taken, so a broken server cannot make the client spin.
const MIN_LEASE: Duration = Duration::from_secs(30);
/// An "infinite" lease is renewed this often anyway.
const MAX_LEASE: Duration = Duration::from_secs(365 * 24 * 3600);

/// A lease: what the server gave this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease: Duration,
    pub t1: Duration,
    pub t2: Duration,
}

/// Where a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// 255.255.255.255:67 out of the client's interface.
    Broadcast,
    /// A server's address, port 67.
    Unicast(Ipv4Addr),
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        dest: Dest,
        payload: Vec<u8>,
    },
    /// Configure this lease (new, or renewed with possibly new options).
    Apply(Lease),
    /// Remove this lease's address: it ended or the server refused it.
    Drop(Lease),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Init,
    Selecting,
    Requesting { offer: Lease, tries: u32 },
    Bound { lease: Lease, at: Instant },
    Renewing { lease: Lease, at: Instant },
    Rebinding { lease: Lease, at: Instant },
}

/// What the client is doing, for console messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Asking for offers; `discovers` sent so far without one.
    Discovering {
        discovers: u32,
    },
    Requesting,
    Bound,
    Renewing,
    Rebinding,
}

/// The client of one interface.
#[derive(Debug)]
pub struct Client {
    mac: [u8; 6],
    hostname: Option<String>,
    state: State,
    xid: u32,
    deadline: Instant,
    /// Current retransmission wait.
    backoff: Duration,
    /// DISCOVERs since the last offer.
    discovers: u32,
    /// When this exchange started, for the `secs` field.
    started: Instant,
    rng: u64,
}

impl Client {
    /// A client that will send its first DISCOVER at the first
    /// [`Client::on_timeout`]. `seed` makes transaction ids and jitter.
    pub fn new(mac: [u8; 6], hostname: Option<String>, seed: u64, now: Instant) -> Self {
        let mut c = Client {
            mac,
            hostname,
            state: State::Init,
            xid: 0,
            deadline: now,
            backoff: FIRST_RETRY,
            discovers: 0,
            started: now,
            rng: seed | 1,
        };
        c.xid = c.random() as u32;
        c
    }

    /// When [`Client::on_timeout`] wants to run next.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn phase(&self) -> Phase {
        match self.state {
            State::Init | State::Selecting => Phase::Discovering { discovers: self.discovers },
            State::Requesting { .. } => Phase::Requesting,
            State::Bound { .. } => Phase::Bound,
            State::Renewing { .. } => Phase::Renewing,
            State::Rebinding { .. } => Phase::Rebinding,
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64: jitter and transaction ids need no more.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn jitter(&mut self) -> Duration {
        Duration::from_millis(self.random() % 1000)
    }

    fn next_backoff(&mut self) -> Duration {
        let wait = self.backoff + self.jitter();
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
        wait
    }

    /// Runs whatever is due at `now`.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        if now < self.deadline {
            return Vec::new();
        }
        match self.state.clone() {
            State::Init => {
                self.xid = self.random() as u32;
                self.started = now;
                self.backoff = FIRST_RETRY;
                self.discovers = 0;
                self.state = State::Selecting;
                self.discover(now)
            }
            State::Selecting => self.discover(now),
            State::Requesting { offer, tries } => {
                if tries >= REQUEST_TRIES {
                    self.restart(now, Duration::ZERO);
                    return self.on_timeout(now);
                }
                self.state = State::Requesting { offer: offer.clone(), tries: tries + 1 };
                self.deadline = now + self.next_backoff();
                vec![self.send(now, REQUEST, Dest::Broadcast, Some(&offer), None)]
            }
            State::Bound { lease, at } => {
                if now >= at + lease.t2 {
                    self.state = State::Rebinding { lease, at };
                } else {
                    self.state = State::Renewing { lease, at };
                }
                self.xid = self.random() as u32;
                self.started = now;
                self.on_timeout(now)
            }
            State::Renewing { lease, at } => {
                if now >= at + lease.t2 {
                    self.state = State::Rebinding { lease, at };
                    return self.on_timeout(now);
                }
                self.deadline = now + half_until(now, at + lease.t2);
                vec![self.send(now, REQUEST, Dest::Unicast(lease.server), None, Some(lease.addr))]
            }
            State::Rebinding { lease, at } => {
                if now >= at + lease.lease {
                    self.restart(now, Duration::ZERO);
                    let mut out = vec![Action::Drop(lease)];
                    out.extend(self.on_timeout(now));
                    return out;
                }
                self.deadline = now + half_until(now, at + lease.lease);
                vec![self.send(now, REQUEST, Dest::Broadcast, None, Some(lease.addr))]
            }
        }
    }

    fn discover(&mut self, now: Instant) -> Vec<Action> {
        self.discovers = self.discovers.saturating_add(1);
        self.deadline = now + self.next_backoff();
        vec![self.send(now, DISCOVER, Dest::Broadcast, None, None)]
    }

    fn restart(&mut self, now: Instant, after: Duration) {
        self.state = State::Init;
        self.deadline = now + after;
    }

    /// Handles a datagram received on port 68.
    pub fn on_message(&mut self, now: Instant, bytes: &[u8]) -> Vec<Action> {
        let Some(reply) = Reply::parse(bytes) else { return Vec::new() };
        if reply.xid != self.xid || reply.chaddr != self.mac {
            return Vec::new();
        }
        match (self.state.clone(), reply.kind) {
            (State::Selecting, OFFER) => {
                let Some(offer) = reply.lease() else { return Vec::new() };
                self.state = State::Requesting { offer: offer.clone(), tries: 1 };
                self.backoff = FIRST_RETRY;
                self.deadline = now + self.next_backoff();
                vec![self.send(now, REQUEST, Dest::Broadcast, Some(&offer), None)]
            }
            (State::Requesting { offer, .. }, ACK) => {
                let Some(lease) = reply.lease() else { return Vec::new() };
                if lease.server != offer.server || lease.addr != offer.addr {
                    return Vec::new();
                }
                self.bind(now, lease, None)
            }
            (State::Requesting { offer, .. }, NAK) => {
                if reply.server.is_some_and(|s| s != offer.server) {
                    return Vec::new();
                }
                // RFC 2131 section 3.1: start again, after a pause so a
                // confused server cannot make the client spin.
                self.restart(now, FIRST_RETRY);
                Vec::new()
            }
            (State::Renewing { lease: old, .. } | State::Rebinding { lease: old, .. }, ACK) => {
                let Some(lease) = reply.lease() else { return Vec::new() };
                self.bind(now, lease, Some(old))
            }
            (State::Renewing { lease: old, .. } | State::Rebinding { lease: old, .. }, NAK) => {
                self.restart(now, Duration::ZERO);
                vec![Action::Drop(old)]
            }
            _ => Vec::new(),
        }
    }

    fn bind(&mut self, now: Instant, lease: Lease, old: Option<Lease>) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(old) = old
            && (old.addr != lease.addr || old.prefix != lease.prefix)
        {
            out.push(Action::Drop(old));
        }
        self.deadline = now + lease.t1;
        self.discovers = 0;
        self.backoff = FIRST_RETRY;
        self.state = State::Bound { lease: lease.clone(), at: now };
        out.push(Action::Apply(lease));
        out
    }

    /// Builds one client message. `offer` names the offered address and its
    /// server (REQUEST while selecting); `ciaddr` is the bound address
    /// (REQUEST while renewing or rebinding).
    fn send(
        &self,
        now: Instant,
        kind: u8,
        dest: Dest,
        offer: Option<&Lease>,
        ciaddr: Option<Ipv4Addr>,
    ) -> Action {
        let mut header = Header::new(BOOTREQUEST, self.xid, self.mac);
        header.secs =
            u16::try_from(now.saturating_duration_since(self.started).as_secs()).unwrap_or(u16::MAX);
        // A renewing client can hear unicast; everyone else asks for broadcast.
        header.flags = if ciaddr.is_some() && dest != Dest::Broadcast { 0 } else { BROADCAST_FLAG };
        if let Some(c) = ciaddr {
            header.ciaddr = c;
        }
        let mut m = MessageBuilder::new(&header);
        m.push(OPT_MESSAGE_TYPE, &[kind]);
        let mut client_id = vec![HTYPE_ETHERNET];
        client_id.extend_from_slice(&self.mac);
        m.push(OPT_CLIENT_ID, &client_id);
        if let Some(o) = offer {
            m.push(OPT_REQUESTED_IP, &o.addr.octets());
            m.push(OPT_SERVER_ID, &o.server.octets());
        }
        m.push(OPT_MAX_SIZE, &576u16.to_be_bytes());
        m.push(
            OPT_PARAMETERS,
            &[
                OPT_SUBNET_MASK,
                OPT_ROUTER,
                OPT_DNS,
                OPT_LEASE_TIME,
                OPT_SERVER_ID,
                OPT_RENEWAL_TIME,
                OPT_REBINDING_TIME,
            ],
        );
        if let Some(h) = &self.hostname {
            // A name longer than the room left is cut rather than left out:
            // servers that register names get its start.
            let h = h.as_bytes();
            m.push(OPT_HOSTNAME, h.get(..m.room()).unwrap_or(h));
        }
        Action::Send { dest, payload: m.finish() }
    }
}

/// Half the time left until `end`, but at least a minute and never past `end`
/// (RFC 2131 section 4.4.5).
fn half_until(now: Instant, end: Instant) -> Duration {
    let left = end.saturating_duration_since(now);
    (left / 2).max(MIN_RENEW_RETRY).min(left).max(Duration::from_secs(1))
}

/// A server message, checked.
#[derive(Debug)]
struct Reply {
    kind: u8,
    xid: u32,
    chaddr: [u8; 6],
    yiaddr: Ipv4Addr,
    mask: Option<Ipv4Addr>,
    router: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
    server: Option<Ipv4Addr>,
    lease: Option<u32>,
    t1: Option<u32>,
    t2: Option<u32>,
}

impl Reply {
    /// The reply in `b`, or `None` when it is not a readable DHCP reply on
    /// Ethernet. An option value of the wrong length is taken as absent:
    /// [`Reply::lease`] decides whether what is left is usable.
    fn parse(b: &[u8]) -> Option<Reply> {
        let header = Header::parse(b).ok()?;
        if header.op != BOOTREPLY || !header.is_ethernet() || !header.is_dhcp() {
            return None;
        }
        let options = Options::parse(b).ok()?;
        Some(Reply {
            kind: options.message_type().ok().flatten()?,
            xid: header.xid,
            chaddr: header.mac(),
            yiaddr: header.yiaddr,
            mask: options.address(OPT_SUBNET_MASK).ok().flatten(),
            router: options.addresses(OPT_ROUTER).ok().and_then(|r| r.first().copied()),
            dns: options.addresses(OPT_DNS).unwrap_or_default(),
            server: options.address(OPT_SERVER_ID).ok().flatten(),
            lease: options.u32(OPT_LEASE_TIME).ok().flatten(),
            t1: options.u32(OPT_RENEWAL_TIME).ok().flatten(),
            t2: options.u32(OPT_REBINDING_TIME).ok().flatten(),
        })
    }

    /// The lease an OFFER or ACK describes, when it is usable.
    fn lease(&self) -> Option<Lease> {
        let a = self.yiaddr;
        if a.is_unspecified() || a.is_broadcast() || a.is_multicast() || a.is_loopback() {
            return None;
        }
        let server = self.server?;
        let prefix = match self.mask {
            Some(m) => mask_prefix(m)?,
            // RFC 2131 leaves it to the client: the class of the address.
            None => match a.octets()[0] {
                0..=127 => 8,
                128..=191 => 16,
                _ => 24,
            },
        };
        if prefix == 0 {
            return None;
        }
        let lease = match self.lease {
            Some(u32::MAX) | None => MAX_LEASE,
            Some(s) => Duration::from_secs(s.into()).clamp(MIN_LEASE, MAX_LEASE),
        };
        let t2_default = lease * 7 / 8;
        let t2 = self.t2.map(|s| Duration::from_secs(s.into())).filter(|t| *t <= lease).unwrap_or(t2_default);
        let t1 =
            self.t1.map(|s| Duration::from_secs(s.into())).filter(|t| *t <= t2).unwrap_or(lease / 2).min(t2);
        let router = self.router.filter(|r| !r.is_unspecified() && *r != a);
        Some(Lease { addr: a, prefix, router, dns: self.dns.clone(), server, lease, t1, t2 })
    }
}

/// The prefix length of a contiguous netmask.
pub fn mask_prefix(m: Ipv4Addr) -> Option<u8> {
    let v = u32::from(m);
    let ones = v.leading_ones();
    (v.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

#[cfg(test)]
mod tests {
    use nodeos_dhcp::{MIN_MESSAGE, OPTIONS_AT};

    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

    /// A server reply to `req` (a client message), as a fake server makes it.
    fn reply(req: &[u8], kind: u8, yiaddr: Ipv4Addr, lease_s: u32, extra: &[(u8, &[u8])]) -> Vec<u8> {
        let mut h = Header::reply_to(&Header::parse(req).unwrap());
        h.yiaddr = yiaddr;
        let mut m = MessageBuilder::new(&h);
        assert!(m.push(OPT_MESSAGE_TYPE, &[kind]));
        assert!(m.push(OPT_SERVER_ID, &SERVER.octets()));
        assert!(m.push(OPT_SUBNET_MASK, &[255, 255, 255, 0]));
        assert!(m.push(OPT_ROUTER, &SERVER.octets()));
        assert!(m.push(OPT_DNS, &[10, 0, 0, 53, 10, 0, 0, 54]));
        assert!(m.push(OPT_LEASE_TIME, &lease_s.to_be_bytes()));
        for (c, d) in extra {
            assert!(m.push(*c, d));
        }
        m.finish()
    }

    fn sent(actions: &[Action]) -> (Dest, Vec<u8>) {
        for a in actions {
            if let Action::Send { dest, payload } = a {
                return (*dest, payload.clone());
            }
        }
        panic!("nothing sent: {actions:?}");
    }

    /// Option `code` of a client message.
    fn option(m: &[u8], code: u8) -> Option<Vec<u8>> {
        Options::parse(m).unwrap().get(code).map(<[u8]>::to_vec)
    }

    fn bound(t0: Instant, lease_s: u32) -> Client {
        let mut c = Client::new(MAC, Some("n1".into()), 42, t0);
        let (_, disc) = sent(&c.on_timeout(t0));
        let (_, req) = sent(&c.on_message(t0, &reply(&disc, OFFER, ADDR, lease_s, &[])));
        let out = c.on_message(t0, &reply(&req, ACK, ADDR, lease_s, &[]));
        assert!(matches!(out.as_slice(), [Action::Apply(_)]), "{out:?}");
        c
    }

    #[test]
    fn discover_offer_request_ack() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, Some("n1".into()), 42, t0);
        assert_eq!(c.deadline(), t0);
        let (dest, disc) = sent(&c.on_timeout(t0));
        assert_eq!(dest, Dest::Broadcast);
        assert_eq!(disc.len(), MIN_MESSAGE);
        assert_eq!(disc[0], BOOTREQUEST);
        assert_eq!(&disc[28..34], &MAC);
        assert_eq!(u16::from_be_bytes([disc[10], disc[11]]), BROADCAST_FLAG);
        assert_eq!(option(&disc, OPT_MESSAGE_TYPE), Some(vec![DISCOVER]));
        assert_eq!(option(&disc, OPT_HOSTNAME), Some(b"n1".to_vec()));
        assert_eq!(option(&disc, OPT_CLIENT_ID), Some([&[1u8][..], &MAC].concat()));
        assert_eq!(c.phase(), Phase::Discovering { discovers: 1 });

        let out = c.on_message(t0, &reply(&disc, OFFER, ADDR, 3600, &[]));
        let (dest, req) = sent(&out);
        assert_eq!(dest, Dest::Broadcast);
        assert_eq!(req[4..8], disc[4..8], "same transaction");
        assert_eq!(option(&req, OPT_MESSAGE_TYPE), Some(vec![REQUEST]));
        assert_eq!(option(&req, OPT_REQUESTED_IP), Some(ADDR.octets().to_vec()));
        assert_eq!(option(&req, OPT_SERVER_ID), Some(SERVER.octets().to_vec()));
        assert_eq!(c.phase(), Phase::Requesting);

        let out = c.on_message(t0, &reply(&req, ACK, ADDR, 3600, &[]));
        let want = Lease {
            addr: ADDR,
            prefix: 24,
            router: Some(SERVER),
            dns: vec![Ipv4Addr::new(10, 0, 0, 53), Ipv4Addr::new(10, 0, 0, 54)],
            server: SERVER,
            lease: Duration::from_secs(3600),
            t1: Duration::from_secs(1800),
            t2: Duration::from_secs(3150),
        };
        assert_eq!(out, vec![Action::Apply(want.clone())]);
        assert_eq!(c.phase(), Phase::Bound);
        assert_eq!(c.deadline(), t0 + Duration::from_secs(1800));
    }

    #[test]
    fn discover_backs_off_and_never_gives_up() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 7, t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            let out = c.on_timeout(now);
            assert_eq!(option(&sent(&out).1, OPT_MESSAGE_TYPE), Some(vec![DISCOVER]));
            waits.push((c.deadline() - now).as_secs());
            now = c.deadline();
            // Nothing is due before the deadline.
            assert!(c.on_timeout(now - Duration::from_millis(1)).is_empty());
        }
        assert_eq!(waits, vec![4, 8, 16, 32, 64, 64, 64, 64, 64, 64]);
        assert_eq!(c.phase(), Phase::Discovering { discovers: 10 });
    }

    #[test]
    fn foreign_and_malformed_replies_are_ignored() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 1, t0);
        let (_, disc) = sent(&c.on_timeout(t0));
        let mut other_xid = reply(&disc, OFFER, ADDR, 3600, &[]);
        other_xid[4] ^= 0xff;
        assert!(c.on_message(t0, &other_xid).is_empty());
        let mut other_mac = reply(&disc, OFFER, ADDR, 3600, &[]);
        other_mac[33] ^= 0xff;
        assert!(c.on_message(t0, &other_mac).is_empty());
        // An ACK while selecting, a request echoed back.
        assert!(c.on_message(t0, &reply(&disc, ACK, ADDR, 3600, &[])).is_empty());
        assert!(c.on_message(t0, &disc).is_empty());
        let good = reply(&disc, OFFER, ADDR, 3600, &[]);
        // An option running past the end: the server identifier is in, but
        // the offer cannot be trusted.
        let mut bad = good[..OPTIONS_AT + 9].to_vec();
        bad.extend_from_slice(&[OPT_DNS, 200, 1, 2]);
        assert!(c.on_message(t0, &bad).is_empty());
        // A broadcast or missing address is not a lease.
        assert!(c.on_message(t0, &reply(&disc, OFFER, Ipv4Addr::BROADCAST, 3600, &[])).is_empty());
        assert!(c.on_message(t0, &reply(&disc, OFFER, Ipv4Addr::UNSPECIFIED, 3600, &[])).is_empty());
        assert_eq!(c.phase(), Phase::Discovering { discovers: 1 });
        assert!(matches!(c.on_message(t0, &good).as_slice(), [Action::Send { .. }]));
    }

    #[test]
    fn cut_short_offers_are_read_as_far_as_they_go() {
        let t0 = Instant::now();
        let fresh = || {
            let mut c = Client::new(MAC, None, 1, t0);
            let (_, disc) = sent(&c.on_timeout(t0));
            (c, disc)
        };
        let good = reply(&fresh().1, OFFER, ADDR, 3600, &[]);
        let taken: Vec<usize> =
            (0..=good.len()).filter(|&n| !fresh().0.on_message(t0, &good[..n]).is_empty()).collect();
        // Options from OPTIONS_AT: type (3 bytes), server identifier (6),
        // mask (6), router (6), name servers (10), lease time (6), end.
        // Cut inside the header or an option: ignored. Cut between options
        // once the server identifier is in: an offer, since UDP hands over
        // whole datagrams and the end option is no proof of completeness.
        let at = |n: usize| OPTIONS_AT + n;
        let mut want = vec![at(9), at(15), at(21), at(31)];
        want.extend(at(37)..=good.len());
        assert_eq!(taken, want);
    }

    #[test]
    fn unanswered_requests_restart_discovery() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 3, t0);
        let (_, disc) = sent(&c.on_timeout(t0));
        let _ = c.on_message(t0, &reply(&disc, OFFER, ADDR, 3600, &[]));
        for _ in 1..REQUEST_TRIES {
            let out = c.on_timeout(c.deadline());
            assert_eq!(option(&sent(&out).1, OPT_MESSAGE_TYPE), Some(vec![REQUEST]));
        }
        let out = c.on_timeout(c.deadline());
        let (_, m) = sent(&out);
        assert_eq!(option(&m, OPT_MESSAGE_TYPE), Some(vec![DISCOVER]));
        assert_ne!(m[4..8], disc[4..8], "a new transaction");
    }

    #[test]
    fn a_nak_while_requesting_restarts_after_a_pause() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 3, t0);
        let (_, disc) = sent(&c.on_timeout(t0));
        let (_, req) = sent(&c.on_message(t0, &reply(&disc, OFFER, ADDR, 3600, &[])));
        assert!(c.on_message(t0, &reply(&req, NAK, Ipv4Addr::UNSPECIFIED, 0, &[])).is_empty());
        assert_eq!(c.deadline(), t0 + FIRST_RETRY);
        assert!(c.on_timeout(t0).is_empty());
        let (_, m) = sent(&c.on_timeout(c.deadline()));
        assert_eq!(option(&m, OPT_MESSAGE_TYPE), Some(vec![DISCOVER]));
    }

    #[test]
    fn renew_at_t1_unicast_then_rebind_at_t2_then_expire() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        // T1 = 500 s: a unicast REQUEST with ciaddr, no requested-ip option.
        let t1 = t0 + Duration::from_secs(500);
        assert!(c.on_timeout(t1 - Duration::from_secs(1)).is_empty());
        let (dest, m) = sent(&c.on_timeout(t1));
        assert_eq!(dest, Dest::Unicast(SERVER));
        assert_eq!(m[12..16], ADDR.octets());
        assert_eq!(u16::from_be_bytes([m[10], m[11]]), 0);
        assert_eq!(option(&m, OPT_REQUESTED_IP), None);
        assert_eq!(c.phase(), Phase::Renewing);
        // Retries until T2 = 875 s: half the time left, at least a minute.
        assert_eq!(c.deadline(), t1 + Duration::from_millis(187_500));
        let (dest, _) = sent(&c.on_timeout(c.deadline()));
        assert_eq!(dest, Dest::Unicast(SERVER));
        let mut now = c.deadline();
        while c.phase() == Phase::Renewing {
            now = c.deadline();
            let _ = c.on_timeout(now);
        }
        assert_eq!(c.phase(), Phase::Rebinding);
        assert_eq!(now, t0 + Duration::from_secs(875), "rebinding starts at T2");
        // Rebinding broadcasts until the lease ends, then drops it and discovers.
        let mut dropped = None;
        for _ in 0..20 {
            for a in c.on_timeout(c.deadline()) {
                match a {
                    Action::Drop(l) => dropped = Some(l),
                    Action::Send { dest, payload } if dropped.is_none() => {
                        assert_eq!(dest, Dest::Broadcast);
                        assert_eq!(option(&payload, OPT_MESSAGE_TYPE), Some(vec![REQUEST]));
                    }
                    _ => {}
                }
            }
            if dropped.is_some() {
                break;
            }
        }
        assert_eq!(dropped.map(|l| l.addr), Some(ADDR));
        assert!(c.deadline() >= t0 + Duration::from_secs(1000));
        assert_eq!(c.phase(), Phase::Discovering { discovers: 1 });
    }

    #[test]
    fn a_renewal_ack_extends_and_a_new_address_drops_the_old() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        let t1 = t0 + Duration::from_secs(500);
        let (_, m) = sent(&c.on_timeout(t1));
        let out = c.on_message(t1, &reply(&m, ACK, ADDR, 1000, &[]));
        assert!(matches!(out.as_slice(), [Action::Apply(l)] if l.addr == ADDR));
        assert_eq!(c.deadline(), t1 + Duration::from_secs(500));
        assert_eq!(c.phase(), Phase::Bound);
        let t1 = c.deadline();
        let (_, m) = sent(&c.on_timeout(t1));
        let other = Ipv4Addr::new(10, 0, 0, 77);
        let out = c.on_message(t1, &reply(&m, ACK, other, 1000, &[]));
        assert!(
            matches!(out.as_slice(), [Action::Drop(old), Action::Apply(new)] if old.addr == ADDR && new.addr == other),
            "{out:?}"
        );
    }

    #[test]
    fn a_nak_while_renewing_drops_the_address() {
        let t0 = Instant::now();
        let mut c = bound(t0, 1000);
        let t1 = t0 + Duration::from_secs(500);
        let (_, m) = sent(&c.on_timeout(t1));
        let out = c.on_message(t1, &reply(&m, NAK, Ipv4Addr::UNSPECIFIED, 0, &[]));
        assert!(matches!(out.as_slice(), [Action::Drop(l)] if l.addr == ADDR));
        let (_, m) = sent(&c.on_timeout(t1));
        assert_eq!(option(&m, OPT_MESSAGE_TYPE), Some(vec![DISCOVER]));
    }

    #[test]
    fn lease_times_are_sane() {
        let t0 = Instant::now();
        let mut c = Client::new(MAC, None, 9, t0);
        let (_, d) = sent(&c.on_timeout(t0));
        // Server-given T1/T2 are used; an infinite lease is capped; tiny ones raised.
        let r = Reply::parse(&reply(
            &d,
            ACK,
            ADDR,
            1000,
            &[(OPT_RENEWAL_TIME, &[0, 0, 0, 100]), (OPT_REBINDING_TIME, &[0, 0, 0, 200])],
        ))
        .and_then(|r| r.lease())
        .expect("lease");
        assert_eq!((r.t1.as_secs(), r.t2.as_secs(), r.lease.as_secs()), (100, 200, 1000));
        let r = Reply::parse(&reply(&d, ACK, ADDR, u32::MAX, &[])).and_then(|r| r.lease()).expect("lease");
        assert_eq!(r.lease, MAX_LEASE);
        let r = Reply::parse(&reply(&d, ACK, ADDR, 1, &[])).and_then(|r| r.lease()).expect("lease");
        assert_eq!(r.lease, MIN_LEASE);
        // T1 past T2 falls back to the defaults.
        let r = Reply::parse(&reply(
            &d,
            ACK,
            ADDR,
            1000,
            &[(OPT_RENEWAL_TIME, &[0, 0, 3, 0]), (OPT_REBINDING_TIME, &[0, 0, 1, 0])],
        ))
        .and_then(|r| r.lease())
        .expect("lease");
        assert!(r.t1 <= r.t2 && r.t2 <= r.lease);
    }

    #[test]
    fn netmasks() {
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 0)), Some(24));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 255, 255)), Some(32));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 255, 240, 0)), Some(20));
        assert_eq!(mask_prefix(Ipv4Addr::new(0, 0, 0, 0)), Some(0));
        assert_eq!(mask_prefix(Ipv4Addr::new(255, 0, 255, 0)), None);
    }
}
