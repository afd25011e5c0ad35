//! Uplinks: a network's tap on one node, enslaved to a host Linux bridge
//! through rtnetlink, so the network's VMs reach what the bridge reaches.

use futures::TryStreamExt;
use rtnetlink::LinkUnspec;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo};

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("cannot open a netlink socket")]
    Netlink(#[source] std::io::Error),
    #[error("host bridge {0:?} does not exist")]
    NoBridge(String),
    #[error("host interface {0:?} is not a Linux bridge")]
    NotBridge(String),
    #[error("cannot look up interface {name}")]
    Lookup {
        name: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("cannot attach {ifname} to bridge {bridge}")]
    Attach {
        ifname: String,
        bridge: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// Attaches interface `ifname` to host bridge `bridge` and sets it up.
pub async fn enslave(ifname: &str, bridge: &str) -> Result<(), UplinkError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(UplinkError::Netlink)?;
    let conn = tokio::spawn(conn);
    let result = async {
        let found = handle.link().get().match_name(bridge.to_owned()).execute().try_next().await;
        let link = match found {
            Ok(Some(l)) => l,
            // The kernel answers ENODEV for a name it does not know.
            Ok(None) | Err(rtnetlink::Error::NetlinkError(_)) => {
                return Err(UplinkError::NoBridge(bridge.to_owned()));
            }
            Err(source) => return Err(UplinkError::Lookup { name: bridge.to_owned(), source }),
        };
        let is_bridge = link.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))))
        });
        if !is_bridge {
            return Err(UplinkError::NotBridge(bridge.to_owned()));
        }
        handle
            .link()
            .set(LinkUnspec::new_with_name(ifname).controller(link.header.index).up().build())
            .execute()
            .await
            .map_err(|source| UplinkError::Attach {
                ifname: ifname.to_owned(),
                bridge: bridge.to_owned(),
                source,
            })
    }
    .await;
    conn.abort();
    result
}
