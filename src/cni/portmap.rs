//! A pod's published ports: CRI port mappings checked and turned into the
//! host ports the nftables rules publish, and the rule for when two clash.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::NetworkError;
use crate::runtime::pod::PortMapping;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// CRI's names (`TCP`, `UDP`, `SCTP`) in any case; empty means TCP, as in CRI.
    pub fn parse(text: &str) -> Option<Protocol> {
        match text.to_ascii_lowercase().as_str() {
            "" | "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The name nftables (and `/etc/protocols`) use.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One port a pod publishes on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostPort {
    pub protocol: Protocol,
    /// Only this host address answers (and so only its family); None: every
    /// local address does.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
}

impl HostPort {
    /// Whether two host ports cannot both be published: same protocol and
    /// port, and addresses that overlap (a wildcard overlaps every address).
    pub fn clashes_with(&self, other: &HostPort) -> bool {
        self.protocol == other.protocol
            && self.host_port == other.host_port
            && match (self.host_ip, other.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(ip) => write!(f, "{ip}:{}/{}", self.host_port, self.protocol),
            None => write!(f, "{}/{}", self.host_port, self.protocol),
        }
    }
}

/// The host ports a pod's mappings publish, checked. A mapping without a
/// host port publishes nothing (it only documents the container port).
pub fn host_ports(mappings: &[PortMapping]) -> Result<Vec<HostPort>, NetworkError> {
    let mut ports: Vec<HostPort> = Vec::new();
    for m in mappings.iter().filter(|m| m.host_port != 0) {
        let bad = |why: String| NetworkError::InvalidPortMapping(why);
        let protocol = Protocol::parse(&m.protocol)
            .ok_or_else(|| bad(format!("protocol {:?} is not TCP, UDP or SCTP", m.protocol)))?;
        let host_port = u16::try_from(m.host_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(format!("host port {} is outside 1..65535", m.host_port)))?;
        let container_port = u16::try_from(m.container_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                bad(format!(
                    "container port {} of host port {host_port} is outside 1..65535",
                    m.container_port
                ))
            })?;
        let host_ip = match m.host_ip.trim() {
            "" => None,
            text => match text.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() => None,
                Ok(ip) => Some(ip),
                Err(_) => return Err(bad(format!("host IP {text:?} is not an IP address"))),
            },
        };
        let port = HostPort {
            protocol,
            host_ip,
            host_port,
            container_port,
        };
        if let Some(earlier) = ports.iter().find(|p| p.clashes_with(&port)) {
            return Err(bad(format!(
                "host port {port} is asked for twice (also as {earlier})"
            )));
        }
        ports.push(port);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn mapping(protocol: &str, container: i32, host: i32, ip: &str) -> PortMapping {
        PortMapping {
            protocol: protocol.to_string(),
            container_port: container,
            host_port: host,
            host_ip: ip.to_string(),
        }
    }

    #[test]
    fn mappings_become_host_ports() {
        let ports = host_ports(&[
            mapping("TCP", 80, 8080, ""),
            mapping("UDP", 53, 5353, "127.0.0.1"),
            mapping("SCTP", 9, 9999, "0.0.0.0"),
            mapping("", 443, 8443, "::"),
            mapping("TCP", 80, 8081, "fd00::1"),
        ])
        .expect("valid");
        assert_eq!(
            ports,
            vec![
                HostPort {
                    protocol: Protocol::Tcp,
                    host_ip: None,
                    host_port: 8080,
                    container_port: 80
                },
                HostPort {
                    protocol: Protocol::Udp,
                    host_ip: Some(Ipv4Addr::LOCALHOST.into()),
                    host_port: 5353,
                    container_port: 53
                },
                HostPort {
                    protocol: Protocol::Sctp,
                    host_ip: None,
                    host_port: 9999,
                    container_port: 9
                },
                HostPort {
                    protocol: Protocol::Tcp,
                    host_ip: None,
                    host_port: 8443,
                    container_port: 443
                },
                HostPort {
                    protocol: Protocol::Tcp,
                    host_ip: "fd00::1".parse().ok(),
                    host_port: 8081,
                    container_port: 80
                },
            ]
        );
    }

    #[test]
    fn container_port_only_publishes_nothing() {
        assert!(
            host_ports(&[mapping("TCP", 80, 0, "")])
                .expect("valid")
                .is_empty()
        );
    }

    #[test]
    fn bad_mappings_are_refused_with_the_reason() {
        for (m, want) in [
            (mapping("ICMP", 80, 8080, ""), "protocol"),
            (mapping("TCP", 80, 70000, ""), "host port 70000"),
            (mapping("TCP", 80, -1, ""), "host port -1"),
            (mapping("TCP", 0, 8080, ""), "container port 0"),
            (mapping("TCP", 80, 8080, "localhost"), "not an IP address"),
        ] {
            let err = host_ports(&[m]).expect_err(want).to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn the_same_host_port_twice_in_a_pod_is_refused() {
        let err = host_ports(&[
            mapping("TCP", 80, 8080, ""),
            mapping("TCP", 81, 8080, "127.0.0.1"),
        ])
        .expect_err("clash")
        .to_string();
        assert!(err.contains("8080"), "{err}");
        // Other protocol, same number: fine.
        host_ports(&[mapping("TCP", 80, 8080, ""), mapping("UDP", 80, 8080, "")])
            .expect("tcp and udp");
    }

    #[test]
    fn clashes_need_same_protocol_port_and_overlapping_address() {
        let p = |protocol, ip: Option<IpAddr>, port| HostPort {
            protocol,
            host_ip: ip,
            host_port: port,
            container_port: 1,
        };
        let a = Some(IpAddr::from([192, 0, 2, 2]));
        let b = Some(IpAddr::from([127, 0, 0, 1]));
        assert!(p(Protocol::Tcp, None, 80).clashes_with(&p(Protocol::Tcp, None, 80)));
        assert!(p(Protocol::Tcp, None, 80).clashes_with(&p(Protocol::Tcp, a, 80)));
        assert!(p(Protocol::Tcp, a, 80).clashes_with(&p(Protocol::Tcp, None, 80)));
        assert!(p(Protocol::Tcp, a, 80).clashes_with(&p(Protocol::Tcp, a, 80)));
        assert!(!p(Protocol::Tcp, a, 80).clashes_with(&p(Protocol::Tcp, b, 80)));
        assert!(!p(Protocol::Tcp, None, 80).clashes_with(&p(Protocol::Udp, None, 80)));
        assert!(!p(Protocol::Sctp, None, 80).clashes_with(&p(Protocol::Sctp, None, 81)));
    }
}
