//! CNI results (0.3.x to 1.x): the pod's IP addresses.

use std::net::IpAddr;

use serde_json::Value;

/// The addresses of the pod's own interfaces, IPv4 first. An IP whose `interface`
/// index names a host-side interface (no `sandbox`) is not the pod's.
pub fn pod_ips(result: &Value) -> Vec<IpAddr> {
    let ifaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let mut ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ip| match ip["interface"].as_u64() {
            Some(i) => ifaces
                .get(i as usize)
                .is_none_or(|f| f["sandbox"].as_str().is_some_and(|s| !s.is_empty())),
            None => true,
        })
        .filter_map(|ip| {
            let addr = ip["address"].as_str()?;
            addr.split('/').next()?.parse::<IpAddr>().ok()
        })
        .collect();
    ips.sort_by_key(|ip| ip.is_ipv6());
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_side_addresses_ipv4_first() {
        let r: Value = serde_json::from_str(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/x"}],
                "ips":[{"address":"fd00::5/64","interface":2},
                       {"address":"10.0.0.1/24","interface":0},
                       {"address":"10.0.0.5/24","gateway":"10.0.0.1","interface":2}]}"#,
        )
        .unwrap();
        let ips: Vec<String> = pod_ips(&r).iter().map(|i| i.to_string()).collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5"]);
        let old: Value = serde_json::from_str(
            r#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.9/16"}]}"#,
        )
        .unwrap();
        assert_eq!(pod_ips(&old).len(), 1);
    }
}
