//! How generated messages read as text: an enum field (an `i32` in prost) by the
//! name of its value, a bytes field as UTF-8. `build.rs` points the
//! `serialize_with` of every such field of the public messages here, so the
//! JSON of a message says `"role": "leader"`, not `"role": 1`; tables call
//! [`enum_name`] for the same words.

use std::borrow::Cow;

use serde::Serializer;

use crate::v1;

/// A generated enumeration whose values' proto names share one prefix.
pub trait ProtoEnum: TryFrom<i32> {
    /// What every value's proto name starts with, e.g. `NODE_ROLE_`.
    const PREFIX: &'static str;
    /// The value's name in its .proto file, e.g. `NODE_ROLE_LEADER`.
    fn proto_name(&self) -> &'static str;
}

macro_rules! proto_enums {
    ($($name:ident: $prefix:literal),* $(,)?) => {$(
        impl ProtoEnum for v1::$name {
            const PREFIX: &'static str = $prefix;
            fn proto_name(&self) -> &'static str {
                self.as_str_name()
            }
        }
    )*};
}

// Every enumeration of the public API. A field of an enum missing here fails
// to build rather than printing numbers.
proto_enums!(
    NodeRole: "NODE_ROLE_",
    NodeHealth: "NODE_HEALTH_",
    EventKind: "EVENT_KIND_",
    PowerAction: "POWER_ACTION_",
    ImageKind: "IMAGE_KIND_",
);

/// The value's proto name without its enum's prefix, in lowercase
/// (`NODE_ROLE_LEADER` reads `leader`). A value this build does not know, as a
/// newer node may send, reads as its number.
pub fn enum_name<E: ProtoEnum>(value: i32) -> String {
    match E::try_from(value) {
        Ok(e) => {
            let name = e.proto_name();
            name.strip_prefix(E::PREFIX).unwrap_or(name).to_ascii_lowercase()
        }
        Err(_) => value.to_string(),
    }
}

/// Bytes as UTF-8, invalid sequences replaced: values are mostly text, and
/// the replacement keeps binary ones printable.
pub fn bytes_text(value: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(value)
}

/// `serialize_with` of an enum field.
pub fn serialize_enum<E: ProtoEnum, S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&enum_name::<E>(*value))
}

/// `serialize_with` of a bytes field.
pub fn serialize_bytes<S: Serializer>(value: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&bytes_text(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_values_read_as_their_lowercase_names() {
        assert_eq!(enum_name::<v1::NodeRole>(v1::NodeRole::Leader as i32), "leader");
        assert_eq!(enum_name::<v1::NodeHealth>(v1::NodeHealth::Unreachable as i32), "unreachable");
        assert_eq!(enum_name::<v1::PowerAction>(v1::PowerAction::Poweroff as i32), "poweroff");
        assert_eq!(enum_name::<v1::ImageKind>(v1::ImageKind::Initrd as i32), "initrd");
        assert_eq!(enum_name::<v1::EventKind>(0), "unspecified");
        assert_eq!(enum_name::<v1::NodeRole>(99), "99");
    }

    #[test]
    fn messages_print_enum_names_and_bytes_as_text() {
        let node = v1::Node {
            id: "00000000000000aa".into(),
            role: v1::NodeRole::Voter as i32,
            health: v1::NodeHealth::Healthy as i32,
            ..Default::default()
        };
        let json = serde_json::to_value(&node).unwrap();
        assert_eq!((json["role"].as_str(), json["health"].as_str()), (Some("voter"), Some("healthy")));
        assert_eq!(json["id"], "00000000000000aa");

        let kv = v1::KeyValue { key: "k".into(), value: b"hello \xff".to_vec(), ..Default::default() };
        assert_eq!(serde_json::to_value(&kv).unwrap()["value"], "hello \u{fffd}");

        let put = v1::PutRequest { key: "k".into(), value: b"v".to_vec(), expect_mod_revision: Some(3) };
        let json = serde_json::to_value(&put).unwrap();
        assert_eq!((json["value"].as_str(), json["expect_mod_revision"].as_u64()), (Some("v"), Some(3)));
    }
}
