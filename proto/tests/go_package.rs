//! What a Go client's generator needs of the API's files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use prost::Message as _;

/// protoc-gen-go refuses a file without a Go import path ("unable to determine Go import
/// path"): every file of `sluice.v1` names one, the same, as one Go package.
#[test]
fn every_file_names_one_go_package() {
    let set = prost_types::FileDescriptorSet::decode(sluice_proto::FILE_DESCRIPTOR_SET).unwrap();
    let files: Vec<_> = set
        .file
        .iter()
        .filter(|file| file.package() == "sluice.v1")
        .collect();
    assert_eq!(files.len(), 4);
    for file in files {
        let go_package = file.options.as_ref().map(|o| o.go_package());
        assert_eq!(
            go_package,
            Some("github.com/sluice-gateway/sluice/proto/sluice/v1;sluicev1"),
            "{}",
            file.name()
        );
    }
}
