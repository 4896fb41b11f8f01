//! The nftables ruleset of a lab router, per NAT type. Interface names are fixed inside every
//! router namespace: `wan` (public side, on the lab's 203.0.113.0/24 segment) and `lan` (a
//! bridge holding the LAN hosts' veths). Everything lives in one table, `ip lab`.

use crate::{NatOptions, NatType};
use std::fmt::Write as _;

/// How long a full-cone / restricted mapping, and a restricted "contacted" entry, outlive the
/// last outbound packet (conntrack's own UDP stream timeout is 120 s).
const MAPPING_TIMEOUT: &str = "3m";

pub(crate) fn ruleset(nat_type: NatType, options: &NatOptions) -> String {
    let mut s = String::from("table ip lab {\n");

    // Impairment first (priority -10) so dropped packets never reach the NAT's own filters;
    // `Nat::set_loss` rewrites only this chain.
    s += "  chain impair {\n    type filter hook forward priority -10; policy accept;\n";
    s += &loss_rule(options.loss_percent);
    s += "  }\n";

    // The WAN firewall of every real home router. Without it an unsolicited packet to the
    // router's public port gets a confirmed conntrack entry (answered by an ICMP error), and
    // the host's later packet to that peer clashes with it and gets a different public port
    // (LAB.md, "Linux conntrack quirk"). Dropped packets are never confirmed, so no clash.
    s += "  chain input {\n    type filter hook input priority 0; policy accept;\n";
    if options.wan_filter {
        s += "    iifname \"wan\" ct state new drop\n";
    }
    s += "  }\n";

    let cone = matches!(nat_type, NatType::FullCone | NatType::Restricted);
    if cone {
        // Public port -> (LAN host, LAN port), learnt from outbound packets after masquerade,
        // so inbound packets to a mapped port find the right host even with several hosts
        // behind the router (LAB.md's single `dnat to <host>` cannot do that).
        let _ = writeln!(
            s,
            "  map fc {{\n    type inet_service : ipv4_addr . inet_service\n    \
             flags dynamic,timeout\n    timeout {MAPPING_TIMEOUT}\n  }}"
        );
    }
    if nat_type == NatType::Restricted {
        // (LAN host, remote address) pairs the host has sent to: the address filter.
        let _ = writeln!(
            s,
            "  set contacted {{\n    type ipv4_addr . ipv4_addr\n    \
             flags dynamic,timeout\n    timeout {MAPPING_TIMEOUT}\n  }}"
        );
    }

    s += "  chain forward {\n    type filter hook forward priority 0; policy accept;\n";
    match nat_type {
        // A plain router: everything passes both ways, the host is reachable by anyone.
        NatType::Public => {}
        NatType::UdpBlocked => {
            s += "    ct state established,related accept\n";
            s += "    iifname \"lan\" oifname \"wan\" tcp dport { 80, 443 } accept\n";
            s += "    iifname \"lan\" oifname \"wan\" drop\n";
            s += "    iifname \"wan\" drop\n";
        }
        _ => {
            s += "    ct state established,related accept\n";
            if nat_type == NatType::Restricted {
                s += "    iifname \"lan\" oifname \"wan\" update @contacted { ip saddr . ip daddr }\n";
                s += "    iifname \"wan\" ct status dnat ip daddr . ip saddr @contacted accept\n";
            } else if nat_type == NatType::FullCone {
                s += "    iifname \"wan\" ct status dnat accept\n";
            }
            // Nothing else comes in from outside (the LAN is not routable from there anyway).
            s += "    iifname \"wan\" drop\n";
        }
    }
    s += "  }\n";

    if nat_type != NatType::Public {
        let masquerade = match nat_type {
            // Endpoint-dependent: a random public port for every new destination.
            NatType::Symmetric => "masquerade random",
            NatType::FullCone | NatType::Restricted => "masquerade persistent",
            // Linux's default: keeps the LAN port when free, endpoint-independent.
            _ => "masquerade",
        };
        let _ = writeln!(
            s,
            "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"wan\" {masquerade}\n  }}"
        );
    }
    if cone {
        // Runs after srcnat, so `udp sport` is already the public port; the LAN side comes
        // from conntrack's original tuple. `update` refreshes the timeout on every packet.
        s += "  chain record {\n    type filter hook postrouting priority srcnat + 10; policy accept;\n";
        s += "    oifname \"wan\" meta l4proto udp update @fc { udp sport : ct original ip saddr . ct original proto-src }\n";
        s += "  }\n";
        // NAT chains see only the first packet of a flow, so this affects unsolicited ones.
        s += "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n";
        s += "    iifname \"wan\" meta l4proto udp dnat ip to udp dport map @fc\n";
        s += "  }\n";
    }
    s += "}\n";
    s
}

pub(crate) fn loss_rule(percent: u8) -> String {
    if percent == 0 {
        String::new()
    } else {
        format!("    numgen random mod 100 < {percent} drop\n")
    }
}

/// Replaces the impairment chain's rules (used while the lab runs).
pub(crate) fn set_loss(percent: u8) -> String {
    let mut s = String::from("flush chain ip lab impair\n");
    if percent > 0 {
        let _ = writeln!(
            s,
            "add rule ip lab impair numgen random mod 100 < {percent} drop"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_differ_per_type_as_documented() {
        let o = NatOptions::default();
        assert!(ruleset(NatType::Symmetric, &o).contains("masquerade random"));
        assert!(ruleset(NatType::FullCone, &o).contains("dnat ip to udp dport map @fc"));
        assert!(ruleset(NatType::Restricted, &o).contains("@contacted accept"));
        assert!(!ruleset(NatType::Public, &o).contains("masquerade"));
        assert!(ruleset(NatType::PortRestricted, &o).contains("iifname \"wan\" ct state new drop"));
        let open = NatOptions {
            wan_filter: false,
            loss_percent: 7,
        };
        let r = ruleset(NatType::PortRestricted, &open);
        assert!(!r.contains("ct state new drop") && r.contains("mod 100 < 7 drop"));
    }
}
