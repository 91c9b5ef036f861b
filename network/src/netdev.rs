//! Per-interface traffic counters of a network namespace, read from
//! `/proc/<pid>/net/dev` of a process inside it (no setns needed).

use std::io;

/// One interface's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    /// Interface name, e.g. `eth0`.
    pub name: String,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Packets received.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Received packets dropped.
    pub rx_dropped: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Sent packets dropped.
    pub tx_dropped: u64,
}

/// The interfaces of `pid`'s network namespace, in the kernel's order.
pub fn read(pid: u32) -> io::Result<Vec<InterfaceCounters>> {
    Ok(parse(&std::fs::read_to_string(format!(
        "/proc/{pid}/net/dev"
    ))?))
}

/// Parses the `net/dev` table (two header lines, then `name: 8 rx fields 8 tx fields`).
pub fn parse(text: &str) -> Vec<InterfaceCounters> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            (v.len() >= 16).then(|| InterfaceCounters {
                name: name.trim().to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_table() {
        let t = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0
  eth0:    9876      55    1    2    0     0          0         0     5432      33    3    4    0     0       0          0
";
        let v = parse(t);
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].name, "eth0");
        assert_eq!(
            (
                v[1].rx_bytes,
                v[1].rx_packets,
                v[1].rx_errors,
                v[1].rx_dropped
            ),
            (9876, 55, 1, 2)
        );
        assert_eq!(
            (
                v[1].tx_bytes,
                v[1].tx_packets,
                v[1].tx_errors,
                v[1].tx_dropped
            ),
            (5432, 33, 3, 4)
        );
    }

    #[test]
    fn reads_own_namespace() {
        let v = read(std::process::id()).unwrap();
        assert!(v.iter().any(|i| i.name == "lo"));
    }
}
