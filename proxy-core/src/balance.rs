//! Choosing a server. The decision is a pure function of the group's configuration and the
//! shared [`Balancer`] state (a schedule cursor, open connections per server, failure windows),
//! which adapters hold once per configuration (in an `Arc`) and hand to every session. The state
//! is atomics only: no lock, no clock — time comes in as an argument, like everywhere in the
//! core.
//!
//! Methods (see [`BalanceMethod`]):
//! * **round-robin** — nginx's smooth weighted round-robin, computed once per configuration as
//!   a schedule (weights 5,1,1 give `a a b a c a a`) that an atomic cursor walks: lock-free,
//!   and the same spread as nginx's per-worker algorithm;
//! * **least connections** — the server with the fewest open connections per unit of weight;
//!   an open tunnel counts until it closes, so long-lived WebSockets spread evenly;
//! * **IP hash** — the client address picks the server, the next ones in order stand in when it
//!   is unavailable;
//! * **consistent hash** — a ketama-style ring of 160 points per unit of weight, placed by
//!   hashing `host:port` and a point number; a key goes to the first point at or after its
//!   hash. Removing one of N servers moves only the keys that were on its points (about 1/N),
//!   and every switchyard instance with the same servers builds the same ring.
//!
//! Availability (nginx's passive health): a server that failed `max_fails` times within
//! `fail_timeout` is skipped for `fail_timeout`; one at `max_conns` is skipped until a
//! connection closes. Backups are used only when no primary is available. When every server is
//! marked failed, the failure marks are ignored rather than refusing the request: a proxy that
//! tries a server that may have recovered serves more than one that answers 502 for the rest of
//! the window. `max_conns` is never exceeded. A group of one server is never marked failed.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::config::{BalanceMethod, Config, UpstreamGroup};

/// Ring points per unit of weight, as ketama and nginx use.
const POINTS_PER_WEIGHT: usize = 160;

/// The ring never holds more points than this; larger groups get fewer points per weight.
const MAX_RING_POINTS: usize = 1 << 20;

/// Shared balancing state for one configuration.
#[derive(Debug)]
pub struct Balancer {
    /// Failure windows are kept as nanoseconds after this instant.
    base: Instant,
    /// One per group, indexed like [`Config::group`].
    groups: Box<[GroupState]>,
}

#[derive(Debug)]
struct GroupState {
    cursor: AtomicUsize,
    /// Smooth weighted round-robin over the primaries, one full cycle.
    schedule: Box<[u16]>,
    /// The same over the backups.
    backup_schedule: Box<[u16]>,
    /// Consistent-hash points, sorted by hash.
    ring: Box<[(u64, u16)]>,
    servers: Box<[ServerState]>,
}

#[derive(Debug, Default)]
struct ServerState {
    /// Requests in flight and open tunnels on this server.
    active: AtomicU32,
    /// Failures counted in the current window.
    fails: AtomicU32,
    /// When the current failure window began (nanoseconds after `base`).
    window_start: AtomicU64,
    /// Unavailable until then (nanoseconds after `base`); 0 when available.
    down_until: AtomicU64,
    /// Failing its active health check.
    unhealthy: AtomicBool,
    /// Consecutive health results that disagree with the current state.
    streak: AtomicU32,
}

/// What a choice may depend on besides the shared state.
#[derive(Debug, Clone, Copy)]
pub struct Choice<'a> {
    /// The client's address (IP hash).
    pub client: IpAddr,
    /// The request's hash key, already hashed with [`key_hash`] (consistent hash).
    pub key: Option<u64>,
    /// Servers (indices into the group) already tried for this request: never chosen again.
    pub tried: &'a [u16],
    /// The current time.
    pub now: Instant,
}

impl Balancer {
    /// Fresh state for `config`, starting its clock at `now`.
    pub fn new(config: &Config, now: Instant) -> Self {
        Balancer {
            base: now,
            groups: config.all_groups().map(GroupState::new).collect(),
        }
    }

    /// Chooses a server of group `gi` of `config` (the configuration this balancer was built
    /// for; see [`Config::group`]) and counts a connection on it: report the outcome with
    /// [`failed`](Self::failed) or [`succeeded`](Self::succeeded), and always end it with
    /// [`release`](Self::release). `None` when every server is tried or at `max_conns`.
    pub fn pick(&self, config: &Config, gi: usize, c: &Choice<'_>) -> Option<u16> {
        let (Some(g), Some(group)) = (self.groups.get(gi), config.group(gi)) else {
            return None;
        };
        let now = self.nanos(c.now);
        let usable = |i: u16, ignore_failures: bool| {
            let s = &g.servers[usize::from(i)];
            let cfg = &group.servers[usize::from(i)];
            !c.tried.contains(&i)
                && (cfg.max_conns == 0 || s.active.load(Ordering::Relaxed) < cfg.max_conns)
                && (ignore_failures
                    || (s.down_until.load(Ordering::Relaxed) <= now
                        && !s.unhealthy.load(Ordering::Relaxed)))
        };
        let found = g
            .choose(group, c, |i| usable(i, false))
            .or_else(|| g.choose(group, c, |i| usable(i, true)))?;
        g.servers[usize::from(found)]
            .active
            .fetch_add(1, Ordering::Relaxed);
        Some(found)
    }
}

impl GroupState {
    fn choose(
        &self,
        group: &UpstreamGroup,
        c: &Choice<'_>,
        usable: impl Fn(u16) -> bool,
    ) -> Option<u16> {
        let g = self;
        match &group.method {
            BalanceMethod::RoundRobin => g
                .walk(&g.schedule, &usable)
                .or_else(|| g.walk(&g.backup_schedule, &usable)),
            BalanceMethod::LeastConn => g
                .least(group, false, &usable)
                .or_else(|| g.least(group, true, &usable)),
            BalanceMethod::IpHash => {
                let n = group.servers.len();
                let start = usize::try_from(ip_hash(c.client) % n as u64).unwrap_or(0);
                (0..n).map(|k| index((start + k) % n)).find(|i| usable(*i))
            }
            BalanceMethod::Hash(_) => {
                let key = c.key.unwrap_or(0);
                let ring = &g.ring;
                let start = ring.partition_point(|(h, _)| *h < key);
                (0..ring.len())
                    .map(|k| ring[(start + k) % ring.len()].1)
                    .find(|i| usable(*i))
            }
        }
    }
}

impl Balancer {
    fn server(&self, gi: usize, server: u16) -> Option<&ServerState> {
        self.groups.get(gi)?.servers.get(usize::from(server))
    }

    /// The connection chosen by [`pick`](Self::pick) is over (released, closed, or its tunnel
    /// ended).
    pub fn release(&self, gi: usize, server: u16) {
        if let Some(s) = self.server(gi, server) {
            // Saturating: a release never makes the count wrap.
            let _ = s
                .active
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// A connection to `server` of group `gi` failed (refused, unreachable, timed out) at
    /// `now`.
    pub fn failed(&self, config: &Config, gi: usize, server: u16, now: Instant) {
        let Some(group) = config.group(gi) else {
            return;
        };
        let (Some(s), Some(cfg)) = (
            self.server(gi, server),
            group.servers.get(usize::from(server)),
        ) else {
            return;
        };
        if cfg.max_fails == 0 || group.servers.len() == 1 {
            return;
        }
        let now = self.nanos(now);
        let window = u64::try_from(cfg.fail_timeout.as_nanos()).unwrap_or(u64::MAX);
        let start = s.window_start.load(Ordering::Relaxed);
        let fails = if now.saturating_sub(start) > window || s.fails.load(Ordering::Relaxed) == 0 {
            s.window_start.store(now, Ordering::Relaxed);
            s.fails.store(1, Ordering::Relaxed);
            1
        } else {
            s.fails.fetch_add(1, Ordering::Relaxed) + 1
        };
        if fails >= cfg.max_fails {
            s.down_until
                .store(now.saturating_add(window).max(1), Ordering::Relaxed);
            s.fails.store(0, Ordering::Relaxed);
        }
    }

    /// A connection to `server` of group `gi` succeeded: its failure count starts over.
    pub fn succeeded(&self, gi: usize, server: u16) {
        if let Some(s) = self.server(gi, server) {
            s.fails.store(0, Ordering::Relaxed);
        }
    }

    /// One active health check of `server` of group `gi` passed or failed. Returns the
    /// server's new state when this result changed it (`true`: healthy again).
    pub fn health_result(
        &self,
        config: &Config,
        gi: usize,
        server: u16,
        passed: bool,
    ) -> Option<bool> {
        let check = config.group(gi)?.health.as_ref()?;
        let s = self.server(gi, server)?;
        let healthy = !s.unhealthy.load(Ordering::Relaxed);
        if passed == healthy {
            s.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = s.streak.fetch_add(1, Ordering::Relaxed) + 1;
        let needed = if healthy { check.fails } else { check.passes };
        if streak < needed {
            return None;
        }
        s.streak.store(0, Ordering::Relaxed);
        s.unhealthy.store(!passed, Ordering::Relaxed);
        Some(passed)
    }

    /// Whether `server` of group `gi` is failing its active health check.
    pub fn is_unhealthy(&self, gi: usize, server: u16) -> bool {
        self.server(gi, server)
            .is_some_and(|s| s.unhealthy.load(Ordering::Relaxed))
    }

    /// Connections counted on `server` of group `gi` now (requests in flight and open
    /// tunnels).
    pub fn active(&self, gi: usize, server: u16) -> u32 {
        self.server(gi, server)
            .map_or(0, |s| s.active.load(Ordering::Relaxed))
    }

    /// Whether `server` of group `gi` is skipped for failures at `now`.
    pub fn is_down(&self, gi: usize, server: u16, now: Instant) -> bool {
        self.server(gi, server)
            .is_some_and(|s| s.down_until.load(Ordering::Relaxed) > self.nanos(now))
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }
}

impl GroupState {
    fn new(group: &UpstreamGroup) -> Self {
        let primaries: Vec<(u16, u32)> = weighted(group, false);
        let backups: Vec<(u16, u32)> = weighted(group, true);
        let ring = match group.method {
            BalanceMethod::Hash(_) => ring(group),
            _ => Box::default(),
        };
        GroupState {
            cursor: AtomicUsize::new(0),
            schedule: smooth_schedule(&primaries),
            backup_schedule: smooth_schedule(&backups),
            ring,
            servers: group
                .servers
                .iter()
                .map(|_| ServerState::default())
                .collect(),
        }
    }

    /// The next usable server in `schedule`, from the shared cursor.
    fn walk(&self, schedule: &[u16], usable: impl Fn(u16) -> bool) -> Option<u16> {
        let n = schedule.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| schedule[(start + k) % n])
            .find(|i| usable(*i))
    }

    /// The usable server (backups or primaries) with the fewest connections per weight; ties
    /// go round the group from the shared cursor, so equal servers share the load.
    fn least(
        &self,
        group: &UpstreamGroup,
        backup: bool,
        usable: impl Fn(u16) -> bool,
    ) -> Option<u16> {
        let n = group.servers.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<(u16, u64, u64)> = None;
        for k in 0..n {
            let i = index((start + k) % n);
            let cfg = &group.servers[usize::from(i)];
            if cfg.backup != backup || !usable(i) {
                continue;
            }
            let active = u64::from(self.servers[usize::from(i)].active.load(Ordering::Relaxed));
            let weight = u64::from(cfg.weight);
            // a/wa < b/wb  ⇔  a·wb < b·wa
            if best.is_none_or(|(_, ba, bw)| active * bw < ba * weight) {
                best = Some((i, active, weight));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

fn index(i: usize) -> u16 {
    // Groups are validated to at most MAX_SERVERS (4096) servers.
    u16::try_from(i).unwrap_or(u16::MAX)
}

fn weighted(group: &UpstreamGroup, backup: bool) -> Vec<(u16, u32)> {
    group
        .servers
        .iter()
        .enumerate()
        .filter(|(_, s)| s.backup == backup)
        .map(|(i, s)| (index(i), s.weight.max(1)))
        .collect()
}

/// One full cycle of nginx's smooth weighted round-robin: each step adds every server's weight
/// to its current value, picks the largest, and takes the total off it. The cycle is as long as
/// the weights' sum (divided by their gcd).
fn smooth_schedule(servers: &[(u16, u32)]) -> Box<[u16]> {
    let divisor = servers.iter().fold(0, |g, (_, w)| gcd(g, *w)).max(1);
    let weights: Vec<i64> = servers
        .iter()
        .map(|(_, w)| i64::from(*w / divisor))
        .collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; servers.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (k, w) in weights.iter().enumerate() {
            current[k] += w;
            if current[k] > current[best] {
                best = k;
            }
        }
        current[best] -= total;
        out.push(servers[best].0);
    }
    out.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The consistent-hash ring: points for every server (backups excluded), sorted.
fn ring(group: &UpstreamGroup) -> Box<[(u64, u16)]> {
    let total_weight: usize = group
        .servers
        .iter()
        .filter(|s| !s.backup)
        .map(|s| s.weight as usize)
        .sum();
    let per_weight = POINTS_PER_WEIGHT
        .min(MAX_RING_POINTS / total_weight.max(1))
        .max(1);
    let mut points = Vec::with_capacity(total_weight * per_weight);
    for (i, s) in group.servers.iter().enumerate() {
        if s.backup {
            continue;
        }
        let name = s.peer.to_string();
        for p in 0..(s.weight as usize * per_weight) {
            let mut h = Fnv::new();
            h.write(name.as_bytes());
            h.write(b"-");
            h.write(p.to_string().as_bytes());
            points.push((h.finish(), index(i)));
        }
    }
    points.sort_unstable();
    points.into_boxed_slice()
}

fn ip_hash(ip: IpAddr) -> u64 {
    let mut h = Fnv::new();
    match ip.to_canonical() {
        IpAddr::V4(v4) => h.write(&v4.octets()),
        IpAddr::V6(v6) => h.write(&v6.octets()),
    }
    h.finish()
}

/// The hash a consistent-hash key is placed on the ring by: FNV-1a over the key's bytes, then
/// a 64-bit finaliser (splitmix64) so that similar keys land far apart. Stable across versions
/// and machines: a fleet of proxies agrees on where every key goes.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(key);
    h.finish()
}

/// FNV-1a with a splitmix64 finish; see [`key_hash`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub(crate) fn finish(self) -> u64 {
        let mut z = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HashKey, Peer, UpstreamServer};
    use proptest::prelude::*;
    use std::time::Duration;

    fn servers(n: u16) -> Vec<UpstreamServer> {
        (1..=n)
            .map(|p| UpstreamServer::new(Peer::new("10.0.0.1", 8000 + p)))
            .collect()
    }

    fn setup(group: UpstreamGroup) -> (Config, Balancer, Instant) {
        let config = Config::new(group);
        let now = Instant::now();
        let b = Balancer::new(&config, now);
        (config, b, now)
    }

    fn choice(now: Instant) -> Choice<'static> {
        Choice {
            client: "192.0.2.1".parse().expect("ip"),
            key: None,
            tried: &[],
            now,
        }
    }

    /// Picks and releases at once, `n` times; returns the chosen indices.
    fn run(config: &Config, b: &Balancer, c: &Choice<'_>, n: usize) -> Vec<u16> {
        (0..n)
            .map(|_| {
                let i = b.pick(config, 0, c).expect("a server");
                b.release(0, i);
                i
            })
            .collect()
    }

    #[test]
    fn smooth_round_robin_interleaves_like_nginx() {
        let s = servers(3);
        let group =
            UpstreamGroup::with_servers(vec![s[0].clone().weight(5), s[1].clone(), s[2].clone()]);
        let (config, b, now) = setup(group);
        let picks = run(&config, &b, &choice(now), 7);
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn a_failed_server_is_skipped_until_its_window_ends() {
        let (config, b, now) = setup(UpstreamGroup::with_servers(servers(2)));
        b.failed(&config, 0, 0, now);
        assert!(b.is_down(0, 0, now));
        assert_eq!(run(&config, &b, &choice(now), 4), [1, 1, 1, 1]);
        let later = now + Duration::from_secs(11);
        assert!(!b.is_down(0, 0, later));
        let mut back = run(&config, &b, &choice(later), 2);
        back.sort_unstable();
        assert_eq!(back, [0, 1]);
    }

    #[test]
    fn backups_only_when_every_primary_is_unavailable() {
        let s = servers(3);
        let group =
            UpstreamGroup::with_servers(vec![s[0].clone(), s[1].clone(), s[2].clone().backup()]);
        let (config, b, now) = setup(group);
        assert!(run(&config, &b, &choice(now), 6).iter().all(|i| *i != 2));
        b.failed(&config, 0, 0, now);
        b.failed(&config, 0, 1, now);
        assert_eq!(run(&config, &b, &choice(now), 3), [2, 2, 2]);
    }

    #[test]
    fn all_marked_failed_still_tries_rather_than_refuse() {
        let (config, b, now) = setup(UpstreamGroup::with_servers(servers(2)));
        b.failed(&config, 0, 0, now);
        b.failed(&config, 0, 1, now);
        assert!(b.pick(&config, 0, &choice(now)).is_some());
    }

    #[test]
    fn tried_servers_are_never_chosen_again() {
        let (config, b, now) = setup(UpstreamGroup::with_servers(servers(3)));
        let tried = [0u16, 2];
        let c = Choice {
            tried: &tried,
            ..choice(now)
        };
        assert_eq!(b.pick(&config, 0, &c), Some(1));
        let all = [0u16, 1, 2];
        let c = Choice {
            tried: &all,
            ..choice(now)
        };
        assert_eq!(b.pick(&config, 0, &c), None);
    }

    #[test]
    fn max_conns_is_a_hard_limit() {
        let mut s = servers(1);
        s[0].max_conns = 2;
        let (config, b, now) = setup(UpstreamGroup::with_servers(s));
        assert_eq!(b.pick(&config, 0, &choice(now)), Some(0));
        assert_eq!(b.pick(&config, 0, &choice(now)), Some(0));
        assert_eq!(b.pick(&config, 0, &choice(now)), None);
        b.release(0, 0);
        assert_eq!(b.pick(&config, 0, &choice(now)), Some(0));
    }

    #[test]
    fn health_checks_take_a_server_out_and_back() {
        use crate::health::{HealthCheck, HealthKind};
        let mut group = UpstreamGroup::with_servers(servers(2));
        let mut check = HealthCheck::new(HealthKind::Tcp);
        check.fails = 2;
        check.passes = 2;
        group.health = Some(check);
        let (config, b, now) = setup(group);
        assert_eq!(
            b.health_result(&config, 0, 0, false),
            None,
            "one failure is not enough"
        );
        assert_eq!(
            b.health_result(&config, 0, 0, true),
            None,
            "a pass resets the streak"
        );
        assert_eq!(b.health_result(&config, 0, 0, false), None);
        assert_eq!(b.health_result(&config, 0, 0, false), Some(false), "down");
        assert!(b.is_unhealthy(0, 0));
        assert_eq!(run(&config, &b, &choice(now), 4), [1, 1, 1, 1]);
        assert_eq!(b.health_result(&config, 0, 0, true), None);
        assert_eq!(b.health_result(&config, 0, 0, true), Some(true), "up again");
        let mut back = run(&config, &b, &choice(now), 2);
        back.sort_unstable();
        assert_eq!(back, [0, 1]);
    }

    #[test]
    fn a_single_server_is_never_marked_failed() {
        let (config, b, now) = setup(UpstreamGroup::with_servers(servers(1)));
        b.failed(&config, 0, 0, now);
        assert!(!b.is_down(0, 0, now));
    }

    #[test]
    fn ip_hash_is_sticky_per_client() {
        let group = UpstreamGroup::with_servers(servers(5)).method(BalanceMethod::IpHash);
        let (config, b, now) = setup(group);
        for ip in ["192.0.2.1", "198.51.100.7", "2001:db8::1"] {
            let c = Choice {
                client: ip.parse().expect("ip"),
                ..choice(now)
            };
            let picks = run(&config, &b, &c, 5);
            assert!(picks.windows(2).all(|w| w[0] == w[1]), "{ip}: {picks:?}");
        }
    }

    fn hash_group(n: u16) -> UpstreamGroup {
        UpstreamGroup::with_servers(servers(n)).method(BalanceMethod::Hash(
            HashKey::parse("$arg_room").expect("key"),
        ))
    }

    fn owner(config: &Config, b: &Balancer, key: u64, now: Instant) -> u16 {
        let c = Choice {
            key: Some(key),
            ..choice(now)
        };
        let i = b.pick(config, 0, &c).expect("a server");
        b.release(0, i);
        i
    }

    proptest! {
        #[test]
        fn round_robin_follows_weights(weights in prop::collection::vec(1u32..=10, 1..8)) {
            let s = servers(weights.len() as u16);
            let group = UpstreamGroup::with_servers(
                s.into_iter().zip(&weights).map(|(s, w)| s.weight(*w)).collect(),
            );
            let (config, b, now) = setup(group);
            let total: u32 = weights.iter().sum();
            let picks = run(&config, &b, &choice(now), total as usize * 3);
            for (i, w) in weights.iter().enumerate() {
                let got = picks.iter().filter(|p| usize::from(**p) == i).count();
                prop_assert_eq!(got, *w as usize * 3, "server {} of {:?}", i, weights);
            }
        }

        #[test]
        fn least_conn_picks_a_minimum(held in prop::collection::vec(0u32..6, 2..6)) {
            let group = UpstreamGroup::with_servers(servers(held.len() as u16))
                .method(BalanceMethod::LeastConn);
            let (config, b, now) = setup(group);
            for (i, n) in held.iter().enumerate() {
                for _ in 0..*n {
                    b.groups[0].servers[i].active.fetch_add(1, Ordering::Relaxed);
                }
            }
            let chosen = b.pick(&config, 0, &choice(now)).expect("a server");
            let min = held.iter().min().copied().unwrap_or(0);
            prop_assert_eq!(held[usize::from(chosen)], min);
        }

        #[test]
        fn consistent_hash_moves_few_keys_when_a_server_leaves(n in 3u16..12, gone in 0u16..12) {
            let gone = gone % n;
            let (config, b, now) = setup(hash_group(n));
            let keys: Vec<u64> = (0..2000u32).map(|k| key_hash(format!("room-{k}").as_bytes())).collect();
            let before: Vec<u16> = keys.iter().map(|k| owner(&config, &b, *k, now)).collect();
            // The same servers minus one, as a new configuration (a server leaving).
            let remaining: Vec<UpstreamServer> = servers(n)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| *i != usize::from(gone))
                .map(|(_, s)| s)
                .collect();
            let group = UpstreamGroup::with_servers(remaining.clone())
                .method(BalanceMethod::Hash(HashKey::parse("$arg_room").expect("key")));
            let (config2, b2, _) = setup(group);
            let mut moved = 0;
            for (k, was) in keys.iter().zip(&before) {
                let now_at = &remaining[usize::from(owner(&config2, &b2, *k, now))].peer;
                let was_at = &config.upstream.servers[usize::from(*was)].peer;
                if now_at != was_at {
                    moved += 1;
                    prop_assert_eq!(*was, gone, "only keys of the server that left move");
                }
            }
            prop_assert!(moved * usize::from(n) <= keys.len() * 2, "moved {} of {}", moved, keys.len());
        }
    }
}
