//! Every RPC of the API has a row in the role table, and every row an RPC.

use std::collections::BTreeSet;

use nodeos_auth::rpc::TABLE;
use prost::Message;

#[test]
fn the_role_table_matches_the_api_exactly() {
    let fds =
        prost_types::FileDescriptorSet::decode(nodeos_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut api = BTreeSet::new();
    for f in &fds.file {
        for s in &f.service {
            for m in &s.method {
                api.insert(format!("/{}.{}/{}", f.package(), s.name(), m.name()));
            }
        }
    }
    let table: BTreeSet<String> = TABLE
        .iter()
        .map(|(p, _, _)| (*p).to_owned())
        .filter(|p| !p.starts_with("/grpc.reflection."))
        .collect();
    let missing: Vec<_> = api.difference(&table).collect();
    let stale: Vec<_> = table.difference(&api).collect();
    assert!(missing.is_empty(), "RPCs without a role (denied to everyone): {missing:?}");
    assert!(stale.is_empty(), "rows for RPCs that do not exist: {stale:?}");
}
