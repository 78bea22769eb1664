use gridforge_proto::v1::{Filesystem, VmSpec, partition::Role};

#[test]
fn spec_file_parses_in_snake_case_with_enum_names() {
    let spec: VmSpec = serde_json::from_str(
        r#"{"name":"web-1","image":{"name":"debian-12-minimal","version":"1"},"disk":{"size_mib":4096,
        "partitions":[{"label":"esp","role":"ESP","size_mib":256,"filesystem":"VFAT"},
        {"label":"root","role":"ROOT","filesystem":"EXT4"}]}}"#,
    )
    .unwrap();
    let disk = spec.disk.unwrap();
    assert_eq!(disk.size_mib, 4096);
    assert_eq!(disk.partitions[0].role(), Role::Esp);
    assert_eq!(disk.partitions[0].size_mib, Some(256));
    assert_eq!(disk.partitions[1].filesystem(), Filesystem::Ext4);
    assert_eq!(disk.partitions[1].size_mib, None);
}

#[test]
fn unknown_fields_and_enum_values_are_rejected() {
    let err = serde_json::from_str::<VmSpec>(r#"{"name":"x","disk":{"partitions":[{"filesystem":"XFS"}]}}"#)
        .unwrap_err();
    assert!(err.to_string().contains("XFS"), "{err}");
    let err = serde_json::from_str::<VmSpec>(r#"{"name":"x","dsk":{}}"#).unwrap_err();
    assert!(err.to_string().contains("dsk"), "{err}");
}
