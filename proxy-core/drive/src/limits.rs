//! Admission: a cap on open client connections (nginx `worker_connections`) and on those from
//! one client address. Over either, a new connection is closed as soon as it is accepted —
//! before any byte is read or any memory is spent on it — and counted in
//! [`Stats::refused`](crate::Stats::refused).
//!
//! The per-address table holds one entry per address with a connection open now, so it is
//! bounded by the open connections, never by the clients ever seen. The address is the socket's:
//! behind a PROXY-protocol balancer it is the balancer's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The admission limits of a server.
#[derive(Debug, Default)]
pub(crate) struct Admission {
    max_total: usize,
    max_per_ip: usize,
    open_per_ip: Mutex<HashMap<IpAddr, u32>>,
}

/// A connection's place in the per-address count, given back when it closes.
#[derive(Debug)]
pub(crate) struct Admitted {
    admission: Option<(Arc<Admission>, IpAddr)>,
}

impl Admission {
    pub(crate) fn new(max_total: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Admission {
            max_total,
            max_per_ip,
            open_per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `ip` while `open` are open, or refuses it.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr, open: usize) -> Option<Admitted> {
        if self.max_total != 0 && open >= self.max_total {
            return None;
        }
        if self.max_per_ip == 0 {
            return Some(Admitted { admission: None });
        }
        let mut table = self.open_per_ip.lock().ok()?;
        let n = table.entry(ip).or_insert(0);
        if *n as usize >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(Admitted {
            admission: Some((Arc::clone(self), ip)),
        })
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.open_per_ip.lock().map(|t| t.len()).unwrap_or(0)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let Some((admission, ip)) = self.admission.take() else {
            return;
        };
        let Ok(mut table) = admission.open_per_ip.lock() else {
            return;
        };
        if let Some(n) = table.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                table.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_hold_and_the_table_is_bounded_by_what_is_open() {
        let a = Admission::new(3, 2);
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        let first = a.admit(ip(1), 0).expect("admitted");
        let second = a.admit(ip(1), 1).expect("admitted");
        assert!(a.admit(ip(1), 2).is_none(), "per-address limit");
        let other = a.admit(ip(2), 2).expect("another address");
        assert!(a.admit(ip(3), 3).is_none(), "total limit");
        drop(first);
        assert!(a.admit(ip(1), 2).is_some(), "a slot came back");
        drop((second, other));
        assert_eq!(a.tracked(), 0, "closed connections leave nothing behind");
        for n in 0..=255 {
            drop(a.admit(ip(n), 0));
        }
        assert_eq!(a.tracked(), 0);
    }
}
