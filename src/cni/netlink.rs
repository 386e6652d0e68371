//! A small synchronous rtnetlink client for the bridge network: links, IPv4
//! and IPv6 addresses and routes of one network namespace, the one the socket was opened in.
//!
//! A socket stays bound to the namespace of the thread that opened it, so a
//! pod's side is reached by opening the socket on a throw-away thread that
//! joined the pod's namespace (`RouteSocket::open_in`); no long-lived thread,
//! and no tokio worker, ever changes namespace.

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use ipnet::IpNet;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage,
};
use netlink_packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};

/// Big enough for any single datagram the kernel sends on a dump (it caps
/// them near 32 KiB).
const RECV_BUFFER: usize = 64 * 1024;

/// What a link is, as far as the bridge network cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    pub up: bool,
    pub master: Option<u32>,
    pub mtu: Option<u32>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            master: None,
            mtu: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Controller(index) => link.master = Some(*index),
                LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// A veth pair to create: the host end and the peer born in another namespace.
pub struct VethPair<'a> {
    pub host_name: &'a str,
    pub peer_name: &'a str,
    pub master: u32,
    pub mtu: u32,
    /// The namespace the peer is created in.
    pub peer_netns: &'a File,
}

/// A NETLINK_ROUTE socket bound to one network namespace.
pub struct RouteSocket {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl RouteSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<RouteSocket> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.set_netlink_get_strict_chk(true)?;
        socket.bind(&SocketAddr::new(0, 0))?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(RouteSocket {
            socket,
            sequence: 0,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// Opens a socket in the network namespace pinned at `netns`, on a thread
    /// of its own that joins that namespace and ends; the caller's thread
    /// never moves. Returns the namespace file too (it names the namespace in
    /// requests such as a veth peer's IFLA_NET_NS_FD).
    pub fn open_in(netns: &Path) -> io::Result<(File, RouteSocket)> {
        let file = File::open(netns)?;
        let target = file.try_clone()?;
        let socket = std::thread::Builder::new()
            .name("berth-netns-nl".to_string())
            .spawn(move || -> io::Result<RouteSocket> {
                nix::sched::setns(&target, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)?;
                RouteSocket::open()
            })?
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))??;
        Ok((file, socket))
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(msg));
        packet.header.flags = NLM_F_REQUEST | flags;
        packet.header.sequence_number = self.sequence;
        packet.finalize();
        let mut out = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut replies = Vec::new();
        loop {
            let size = self.socket.recv(&mut &mut self.buffer[..], 0)?;
            let mut data = &self.buffer[..size.min(self.buffer.len())];
            while !data.is_empty() {
                let reply: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(data)
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {e}"))
                    })?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number != self.sequence {
                    // A late answer to an earlier request: skip it.
                } else {
                    match reply.payload {
                        NetlinkPayload::Done(_) => return Ok(replies),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                Some(_) => Err(e.to_io()),
                                None => Ok(replies),
                            };
                        }
                        NetlinkPayload::InnerMessage(m) => {
                            replies.push(m);
                            if !dump && flags & NLM_F_ACK == 0 {
                                return Ok(replies);
                            }
                        }
                        _ => {}
                    }
                }
                if len == 0 || len >= data.len() {
                    break;
                }
                data = &data[align4(len).min(data.len())..];
            }
        }
    }

    /// The link called `name`, or None when there is none.
    pub fn link(&mut self, name: &str) -> io::Result<Option<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::GetLink(msg), 0) {
            Ok(replies) => Ok(replies.iter().find_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(Link::from_message(m)),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link whose master is `master`.
    pub fn links_of_master(&mut self, master: u32) -> io::Result<Vec<Link>> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::Controller(master));
        let replies = self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_DUMP)?;
        Ok(replies
            .iter()
            .filter_map(|r| match r {
                RouteNetlinkMessage::NewLink(m) => Some(Link::from_message(m)),
                _ => None,
            })
            // Older kernels ignore the filter: apply it here too.
            .filter(|l| l.master == Some(master))
            .collect())
    }

    /// Creates a bridge, up, with a fixed MAC address (a bridge without one
    /// takes the lowest MAC of its ports, which changes as pods come and go
    /// and leaves stale ARP entries in the pods).
    pub fn create_bridge(&mut self, name: &str, mtu: u32, mac: [u8; 6]) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        msg.attributes
            .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
                InfoKind::Bridge,
            )]));
        self.request(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Creates a veth pair in one request: the host end attached to its
    /// master and up, the peer born (down) inside the other namespace.
    pub fn create_veth(&mut self, pair: &VethPair<'_>) -> io::Result<()> {
        // The peer cannot be born up: the kernel opens it before the pair is
        // joined (veth_open then fails with ENOTCONN). It is set up inside.
        let mut peer = LinkMessage::default();
        peer.attributes
            .push(LinkAttribute::IfName(pair.peer_name.to_string()));
        peer.attributes.push(LinkAttribute::Mtu(pair.mtu));
        peer.attributes
            .push(LinkAttribute::NetNsFd(pair.peer_netns.as_raw_fd()));

        let mut host = LinkMessage::default();
        host.header.flags = LinkFlags::Up;
        host.header.change_mask = LinkFlags::Up;
        host.attributes
            .push(LinkAttribute::IfName(pair.host_name.to_string()));
        host.attributes.push(LinkAttribute::Mtu(pair.mtu));
        host.attributes.push(LinkAttribute::Controller(pair.master));
        host.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(host),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Turns hairpin mode on for the bridge port called `name`, so a frame
    /// may leave through the port it came in by. With br_netfilter (as on
    /// Kubernetes nodes) a pod reaching itself through a host port is DNATed
    /// at the bridge and sent back out its own port.
    pub fn set_hairpin(&mut self, name: &str) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::PortKind(InfoPortKind::Bridge),
            LinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(
                true,
            )])),
        ]));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_ACK)?;
        Ok(())
    }

    /// Deletes the link called `name`; false when there was none.
    pub fn delete_link(&mut self, name: &str) -> io::Result<bool> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::DelLink(msg), NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Sets IFF_UP on a link.
    pub fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), NLM_F_ACK)?;
        Ok(())
    }

    /// The addresses of a link (both families), with their prefix lengths.
    pub fn addresses(&mut self, index: u32) -> io::Result<Vec<IpNet>> {
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        let replies = self.request(RouteNetlinkMessage::GetAddress(msg), NLM_F_DUMP)?;
        let mut addresses = Vec::new();
        for reply in replies {
            let RouteNetlinkMessage::NewAddress(m) = reply else {
                continue;
            };
            if m.header.index != index {
                continue;
            }
            // IFA_LOCAL is the address for IPv4; IPv6 messages carry only IFA_ADDRESS.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(ip) = address
                && let Ok(net) = IpNet::new(ip, m.header.prefix_len)
            {
                addresses.push(net);
            }
        }
        Ok(addresses)
    }

    /// Adds an address to a link: IPv4 with its broadcast address, IPv6
    /// without duplicate address detection, so it is usable at once instead
    /// of tentative for a second or more (the subnet is berth's own).
    pub fn add_address(&mut self, index: u32, address: IpNet) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.prefix_len = address.prefix_len();
        msg.header.index = index;
        match address {
            IpNet::V4(v4) => {
                msg.header.family = AddressFamily::Inet;
                msg.attributes
                    .push(AddressAttribute::Local(IpAddr::V4(v4.addr())));
                msg.attributes
                    .push(AddressAttribute::Address(IpAddr::V4(v4.addr())));
                msg.attributes
                    .push(AddressAttribute::Broadcast(v4.broadcast()));
            }
            IpNet::V6(v6) => {
                msg.header.family = AddressFamily::Inet6;
                msg.header.flags = AddressHeaderFlags::Nodad;
                msg.attributes
                    .push(AddressAttribute::Address(IpAddr::V6(v6.addr())));
                msg.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
        }
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }

    /// Removes an address from a link.
    pub fn delete_address(&mut self, index: u32, address: IpNet) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = match address {
            IpNet::V4(_) => AddressFamily::Inet,
            IpNet::V6(_) => AddressFamily::Inet6,
        };
        msg.header.prefix_len = address.prefix_len();
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(address.addr()));
        self.request(RouteNetlinkMessage::DelAddress(msg), NLM_F_ACK)?;
        Ok(())
    }

    /// Adds the default route of `gateway`'s family via it on link `index`.
    pub fn add_default_route(&mut self, gateway: IpAddr, index: u32) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = match gateway {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.header.destination_prefix_length = 0;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gateway)));
        msg.attributes.push(RouteAttribute::Oif(index));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )?;
        Ok(())
    }
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}
