//! Work-arounds for faults of the bridge plugin (Debian 12 ships 1.1.1) that
//! would leave a pod's masquerade rules behind or make its DEL fail for good.
//!
//! The bridge plugin names a pod's masquerade chain `CNI-` + the first 24
//! hex digits of sha512(network name + container id), with a POSTROUTING
//! rule jumping to it. Its DEL (1) deletes the pod's veth, then (2) removes
//! the masquerade for the addresses it found on it. So:
//! - an ADD cut short after the address but before the chain existed makes
//!   every DEL fail with "Chain 'CNI-…' does not exist" (go-iptables does
//!   not read iptables-nft's wording as "not there"): podvisor creates the
//!   empty chain before DEL;
//! - a DEL that failed at (2), or a pod whose addresses were gone, leaves
//!   the chain and its rule for good, since the next DEL finds no veth:
//!   podvisor removes what is left of the chain after DEL.
//!
//! Both touch only that one pod's chain, in both address families.

use sha2::{Digest, Sha512};
use tokio::process::Command;

use crate::cni::NetworkConfList;

const TOOLS: [&str; 2] = ["iptables", "ip6tables"];

/// The pod's masquerade chain when the list has a bridge with `ipMasq`.
pub(crate) fn bridge_masquerade_chain(
    list: &NetworkConfList,
    container_id: &str,
) -> Option<String> {
    let masquerades = list.plugins.iter().any(|p| {
        p.get("type").and_then(|t| t.as_str()) == Some("bridge")
            && p.get("ipMasq").and_then(|m| m.as_bool()) == Some(true)
    });
    masquerades.then(|| masquerade_chain_name(&list.name, container_id))
}

fn masquerade_chain_name(network: &str, container_id: &str) -> String {
    let digest = Sha512::digest(format!("{network}{container_id}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("CNI-{}", &hex[..24])
}

async fn run(tool: &str, args: &[&str]) -> Option<String> {
    let mut full = vec!["-w", "-t", "nat"];
    full.extend_from_slice(args);
    match Command::new(tool).args(&full).output().await {
        Ok(out) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into_owned()),
        _ => None,
    }
}

/// Before DEL: make sure the chain exists (an existing one is kept).
pub(crate) async fn before_del(chain: &str) {
    for tool in TOOLS {
        run(tool, &["-N", chain]).await;
    }
}

/// After DEL: remove the POSTROUTING rules jumping to the chain, and the
/// chain. Nothing happens where the plugin already removed them.
pub(crate) async fn after_del(chain: &str) {
    for tool in TOOLS {
        if run(tool, &["-S", chain]).await.is_none() {
            continue;
        }
        tracing::info!(
            tool,
            chain,
            "removing a masquerade chain the bridge plugin left"
        );
        if let Some(listing) = run(tool, &["-L", "POSTROUTING", "-n", "--line-numbers"]).await {
            let mut numbers: Vec<u32> = listing
                .lines()
                .filter_map(|line| {
                    let mut cols = line.split_whitespace();
                    let num = cols.next()?.parse().ok()?;
                    (cols.next()? == chain).then_some(num)
                })
                .collect();
            numbers.sort_unstable_by(|a, b| b.cmp(a));
            for n in numbers {
                run(tool, &["-D", "POSTROUTING", &n.to_string()]).await;
            }
        }
        run(tool, &["-F", chain]).await;
        run(tool, &["-X", chain]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_match_the_bridge_plugin() {
        // As the plugin named it for network "podvisor", container "pod-a".
        assert_eq!(
            masquerade_chain_name("podvisor", "pod-a"),
            "CNI-c03afb04a6b4fed0961cd35f"
        );
        let list = NetworkConfList::parse(
            crate::cni::DefaultNetwork::default()
                .conflist_json()
                .to_string()
                .as_bytes(),
            std::path::Path::new("default"),
        )
        .unwrap();
        assert_eq!(
            bridge_masquerade_chain(&list, "pod-a").as_deref(),
            Some("CNI-c03afb04a6b4fed0961cd35f")
        );
    }
}
