//! Writing, reading and growing GPTs on sparse files and loop devices, checked with sgdisk.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use gridforge_agent::partition::{self, GptPlan, PartitionError, PartitionRequest};
use gridforge_proto::v1::partition::Role;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Runs a tool and returns its stdout; fails loudly when the tool is missing or fails.
fn run(program: &str, args: &[&str]) -> String {
    let output = match Command::new(program).args(args).output() {
        Ok(output) => output,
        Err(error) if error.kind() == ErrorKind::NotFound => {
            panic!("{program} is not installed; these tests need gdisk and util-linux")
        }
        Err(error) => panic!("running {program}: {error}"),
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A loop device over a file, detached on drop even when the test fails.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(file: &Path, sector_size: u32) -> Self {
        let sector_size = sector_size.to_string();
        let file = file.to_str().unwrap();
        let path = run("losetup", &["--sector-size", &sector_size, "-f", "--show", file]).trim().to_owned();
        assert!(path.starts_with("/dev/loop"), "losetup printed {path:?}");
        let device = Self { path };
        assert_eq!(run("blockdev", &["--getss", &device.path]).trim(), sector_size);
        device
    }

    fn open(&self) -> File {
        open_rw(Path::new(&self.path))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new().read(true).write(true).open(path).unwrap()
}

fn request(label: &str, role: Role, size_bytes: Option<u64>) -> PartitionRequest {
    PartitionRequest { label: label.to_owned(), role, size_bytes }
}

fn esp_and_root() -> Vec<PartitionRequest> {
    vec![request("esp", Role::Esp, Some(256 * MIB)), request("root", Role::Root, None)]
}

fn four_partitions() -> Vec<PartitionRequest> {
    vec![
        request("esp", Role::Esp, Some(256 * MIB)),
        request("root", Role::Root, Some(GIB)),
        request("swap", Role::Swap, Some(128 * MIB)),
        request("data", Role::Data, None),
    ]
}

/// sgdisk's type code for each role.
fn sgdisk_code(role: Role) -> &'static str {
    match role {
        Role::Esp => "EF00",
        Role::Root => "8304",
        Role::Swap => "8200",
        Role::Data => "8300",
        Role::Unspecified => unreachable!(),
    }
}

/// What a user checks with sgdisk after partitioning: a clean verify, a protective MBR covering the
/// disk, and every partition exactly as planned.
fn assert_sgdisk_matches(device: &str, plan: &GptPlan) {
    let verify = run("sgdisk", &["-v", device]);
    assert!(verify.contains("No problems found"), "sgdisk -v {device}:\n{verify}");

    let disk_sectors = plan.disk_size / u64::from(plan.sector_size);
    assert_eq!(protective_mbr_sectors(device), (1, disk_sectors - 1));

    let table = run("sgdisk", &["-p", device]);
    let disk_guid = format!("Disk identifier (GUID): {}", upper(&plan.disk_guid));
    assert!(table.contains(&disk_guid), "sgdisk -p {device}:\n{table}");
    // "Sector size (logical): 512 bytes" for files, "(logical/physical): 4096/4096 bytes" for devices.
    let sector_line = table.lines().find(|line| line.starts_with("Sector size (logical")).unwrap();
    assert!(sector_line.contains(&format!(" {}", plan.sector_size)), "{sector_line}");

    let align = MIB / u64::from(plan.sector_size);
    for planned in &plan.partitions {
        let info = run("sgdisk", &["-i", &planned.number.to_string(), device]);
        let expected = [
            format!("Partition GUID code: {}", upper(&planned.type_guid)),
            format!("Partition unique GUID: {}", upper(&planned.part_guid)),
            format!("First sector: {} ", planned.first_lba),
            format!("Last sector: {} ", planned.last_lba),
            format!("Partition name: '{}'", planned.label),
        ];
        for line in expected {
            assert!(info.contains(&line), "sgdisk -i {}: missing {line:?}:\n{info}", planned.number);
        }
        assert_eq!(planned.first_lba % align, 0, "partition {} start", planned.number);
        assert_eq!(planned.offset_bytes() % MIB, 0);
        let row = table
            .lines()
            .find(|line| line.split_whitespace().next() == Some(&planned.number.to_string()))
            .unwrap_or_else(|| panic!("partition {} missing from sgdisk -p", planned.number));
        assert!(row.contains(sgdisk_code(planned.role)), "{row}");
    }
}

/// First and last sector of the 0xEE partition as `sgdisk -O` lists the MBR.
fn protective_mbr_sectors(device: &str) -> (u64, u64) {
    let mbr = run("sgdisk", &["-O", device]);
    let protective = mbr
        .lines()
        .find(|line| line.trim_end().ends_with("0xEE"))
        .unwrap_or_else(|| panic!("no 0xEE entry in sgdisk -O {device}:\n{mbr}"));
    // "   1                     1      2097151   primary     0xEE"
    let fields: Vec<u64> = protective.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    assert_eq!(fields.len(), 3, "{mbr}");
    (fields[1], fields[2])
}

fn upper(guid: &uuid::Uuid) -> String {
    guid.hyphenated().to_string().to_uppercase()
}

/// `read` returns exactly what `write` was given.
fn assert_read_matches(disk: &File, plan: &GptPlan) {
    let table = partition::read(disk, plan.sector_size).unwrap();
    assert_eq!(table.disk_guid, plan.disk_guid);
    assert_eq!(table.disk_size, plan.disk_size);
    assert_eq!(table.sector_size, plan.sector_size);
    assert_eq!(table.first_usable_lba, plan.first_usable_lba());
    assert_eq!(table.last_usable_lba, plan.last_usable_lba());
    assert!(table.primary_header_valid);
    assert!(table.backup_at_end);
    assert_eq!(table.partitions.len(), plan.partitions.len());
    for (found, planned) in table.partitions.iter().zip(&plan.partitions) {
        assert_eq!(found.number, planned.number);
        assert_eq!(found.label, planned.label);
        assert_eq!(found.type_guid, planned.type_guid);
        assert_eq!(found.part_guid, planned.part_guid);
        assert_eq!((found.first_lba, found.last_lba), (planned.first_lba, planned.last_lba));
        assert_eq!(found.role, Some(planned.role));
        assert_eq!(found.offset_bytes(), planned.offset_bytes());
        assert_eq!(found.size_bytes(), planned.size_bytes());
    }
}

fn plan_and_write(disk: &File, requests: &[PartitionRequest], disk_size: u64, sector_size: u32) -> GptPlan {
    let plan = partition::plan(requests, disk_size, sector_size).unwrap();
    partition::write(disk, &plan).unwrap();
    plan
}

#[test]
fn esp_and_root_on_a_512_byte_sector_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", 3 * GIB);
    let disk = open_rw(&path);
    let plan = plan_and_write(&disk, &esp_and_root(), 3 * GIB, 512);
    assert_eq!(plan.partitions[0].offset_bytes(), MIB);
    assert_eq!(plan.partitions[0].size_bytes(), 256 * MIB);
    assert_eq!(plan.partitions[1].size_bytes(), 3 * GIB - 258 * MIB);
    assert_sgdisk_matches(path.to_str().unwrap(), &plan);
    assert_read_matches(&disk, &plan);
}

#[test]
fn four_partitions_on_a_512_byte_sector_file() {
    let dir = tempfile::tempdir().unwrap();
    // Not a whole number of MiB, so the rest partition has to round its end down.
    let disk_size = 5 * GIB + 7 * 512;
    let path = sparse_file(dir.path(), "disk.img", disk_size);
    let disk = open_rw(&path);
    let plan = plan_and_write(&disk, &four_partitions(), disk_size, 512);
    assert_eq!(plan.partitions[3].size_bytes() % MIB, 0);
    assert_sgdisk_matches(path.to_str().unwrap(), &plan);
    assert_read_matches(&disk, &plan);
}

#[test]
fn esp_and_root_on_a_4096_byte_sector_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", 3 * GIB);
    let device = LoopDevice::attach(&path, 4096);
    let disk = device.open();
    let plan = plan_and_write(&disk, &esp_and_root(), 3 * GIB, 4096);
    assert_eq!(plan.first_usable_lba(), 6);
    assert_eq!(plan.last_usable_lba(), 3 * GIB / 4096 - 6);
    assert_sgdisk_matches(&device.path, &plan);
    assert_read_matches(&disk, &plan);
}

#[test]
fn four_partitions_on_a_4096_byte_sector_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let disk_size = 5 * GIB + 3 * 4096;
    let path = sparse_file(dir.path(), "disk.img", disk_size);
    let device = LoopDevice::attach(&path, 4096);
    let disk = device.open();
    let plan = plan_and_write(&disk, &four_partitions(), disk_size, 4096);
    assert_sgdisk_matches(&device.path, &plan);
    assert_read_matches(&disk, &plan);
}

/// Bytes `write` may change: LBA 0 up to the first usable LBA, and the backup area at the end.
fn outside_gpt_areas(plan: &GptPlan) -> std::ops::Range<usize> {
    let sector = u64::from(plan.sector_size);
    (plan.first_usable_lba() * sector) as usize..((plan.last_usable_lba() + 1) * sector) as usize
}

#[test]
fn write_touches_only_the_gpt_areas() {
    for sector_size in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let disk_size = 8 * MIB;
        let path = dir.path().join("disk.img");
        let pattern: Vec<u8> = (0..=250u8).map(|b| b | 1).collect();
        let before: Vec<u8> = pattern.iter().copied().cycle().take(disk_size as usize).collect();
        std::fs::write(&path, &before).unwrap();
        let disk = open_rw(&path);
        let requests = [request("esp", Role::Esp, Some(2 * MIB)), request("root", Role::Root, None)];
        let plan = plan_and_write(&disk, &requests, disk_size, sector_size);
        let after = std::fs::read(&path).unwrap();
        let untouched = outside_gpt_areas(&plan);
        assert!(
            before[untouched.clone()] == after[untouched.clone()],
            "{sector_size}: bytes changed in {untouched:?}"
        );
        // And the GPT areas really were rewritten (the whole of LBA 0, the MBR signature, the headers).
        assert_eq!(&after[510..512], &[0x55, 0xAA]);
        assert!(after[512..sector_size as usize].iter().all(|&b| b == 0));
        let header = sector_size as usize;
        assert_eq!(&after[header..header + 8], b"EFI PART");
        let backup = (disk_size - u64::from(sector_size)) as usize;
        assert_eq!(&after[backup..backup + 8], b"EFI PART");
        if sector_size == 512 {
            let verify = run("sgdisk", &["-v", path.to_str().unwrap()]);
            assert!(verify.contains("No problems found"), "{verify}");
        }
    }
}

#[test]
fn write_refuses_a_plan_for_another_disk_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", GIB);
    let disk = open_rw(&path);
    let plan = partition::plan(&esp_and_root(), 2 * GIB, 512).unwrap();
    let error = partition::write(&disk, &plan).unwrap_err();
    assert!(
        matches!(error, PartitionError::DiskSizeMismatch { planned, actual } if planned == 2 * GIB && actual == GIB),
        "{error:?}"
    );
    assert!(matches!(partition::read(&disk, 512), Err(PartitionError::NoTable)));
}

#[test]
fn write_refuses_a_tampered_plan() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", GIB);
    let disk = open_rw(&path);
    let mut plan = partition::plan(&esp_and_root(), GIB, 512).unwrap();
    plan.partitions[1].first_lba = plan.partitions[0].last_lba;
    let error = partition::write(&disk, &plan).unwrap_err();
    assert!(error.to_string().contains("overlaps"), "{error}");
    let mut plan = partition::plan(&esp_and_root(), GIB, 512).unwrap();
    plan.partitions[1].last_lba = plan.last_usable_lba() + 1;
    let error = partition::write(&disk, &plan).unwrap_err();
    assert!(matches!(error, PartitionError::InvalidPlan { .. }), "{error:?}");
}

#[test]
fn read_without_a_gpt_is_no_table() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "blank.img", 64 * MIB);
    let disk = open_rw(&path);
    for sector_size in [512, 4096] {
        let error = partition::read(&disk, sector_size).unwrap_err();
        assert!(matches!(error, PartitionError::NoTable), "{error:?}");
        assert_eq!(error.to_string(), "no GPT found on the disk");
        let error = partition::relocate_backup_and_grow_last(&disk, sector_size).unwrap_err();
        assert!(matches!(error, PartitionError::NoTable), "{error:?}");
    }
    let empty = sparse_file(dir.path(), "empty.img", 0);
    assert!(matches!(partition::read(&open_rw(&empty), 512), Err(PartitionError::NoTable)));
    // A 512-byte table read as 4096-byte sectors is not found either.
    let plan = plan_and_write(&disk, &esp_and_root()[1..], 64 * MIB, 512);
    assert!(matches!(partition::read(&disk, 4096), Err(PartitionError::NoTable)));
    assert_read_matches(&disk, &plan);
    assert!(matches!(
        partition::read(&disk, 1024),
        Err(PartitionError::UnsupportedSectorSize { sector_size: 1024 })
    ));
}

#[test]
fn read_falls_back_to_the_backup_when_the_primary_is_damaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", GIB);
    let disk = open_rw(&path);
    let plan = plan_and_write(&disk, &esp_and_root(), GIB, 512);
    disk.write_all_at(&[0u8; 512], 512).unwrap();
    let table = partition::read(&disk, 512).unwrap();
    assert!(!table.primary_header_valid);
    assert!(table.backup_at_end);
    assert_eq!(table.disk_guid, plan.disk_guid);
    assert_eq!(table.partitions.len(), 2);
    assert_eq!(table.partitions[1].part_guid, plan.partitions[1].part_guid);
}

/// Writes a marker inside a partition, to check that moving the table leaves partition data alone.
fn put_marker(disk: &File, offset: u64) {
    disk.write_all_at(b"partition data stays", offset).unwrap();
}

fn assert_marker(disk: &File, offset: u64) {
    let mut marker = [0u8; 20];
    disk.read_exact_at(&mut marker, offset).unwrap();
    assert_eq!(&marker, b"partition data stays");
}

/// The first and last MiB of a disk, where every GPT structure lives.
fn head_and_tail(disk: &File, disk_size: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; 2 * MIB as usize];
    let (head, tail) = bytes.split_at_mut(MIB as usize);
    disk.read_exact_at(head, 0).unwrap();
    disk.read_exact_at(tail, disk_size - MIB).unwrap();
    bytes
}

#[test]
fn relocate_and_grow_an_image_on_a_larger_512_byte_file() {
    let dir = tempfile::tempdir().unwrap();
    let image_size = 300 * MIB;
    let path = sparse_file(dir.path(), "disk.img", image_size);
    let disk = open_rw(&path);
    let plan = plan_and_write(&disk, &esp_and_root(), image_size, 512);
    let root = &plan.partitions[1];
    put_marker(&disk, root.offset_bytes() + root.size_bytes() - 20);
    let old_backup_header = image_size - 512;

    // The image lands on a 2 GiB target: same bytes at the front, zeros after.
    let target_size = 2 * GIB + 12345 * 512;
    disk.set_len(target_size).unwrap();
    let before = partition::read(&disk, 512).unwrap();
    assert!(before.primary_header_valid);
    assert!(!before.backup_at_end);

    let outcome = partition::relocate_backup_and_grow_last(&disk, 512).unwrap();
    assert_eq!(outcome.partition_number, 2);
    assert_eq!(outcome.first_lba, root.first_lba);
    assert_eq!(outcome.offset_bytes(), root.offset_bytes());
    assert_eq!(outcome.old_last_lba, root.last_lba);
    assert!(outcome.grown() && outcome.backup_moved);
    assert_eq!((outcome.new_last_lba + 1) % 2048, 0);
    assert_eq!(outcome.new_size_bytes() % MIB, 0);
    assert!(outcome.new_last_lba + 2048 > target_size / 512 - 34, "grown to within 1 MiB of the end");

    let device = path.to_str().unwrap();
    let verify = run("sgdisk", &["-v", device]);
    assert!(verify.contains("No problems found"), "{verify}");
    let listing = run("sgdisk", &["-p", device]);
    let row = listing.lines().find(|line| line.trim_start().starts_with("2 ")).unwrap();
    let fields: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(fields[1..3], [root.first_lba.to_string(), outcome.new_last_lba.to_string()], "{listing}");
    assert_eq!(protective_mbr_sectors(device), (1, target_size / 512 - 1));

    let after = partition::read(&disk, 512).unwrap();
    assert!(after.primary_header_valid && after.backup_at_end);
    assert_eq!(after.disk_guid, plan.disk_guid);
    assert_eq!(after.partitions[0].last_lba, plan.partitions[0].last_lba);
    assert_eq!(after.partitions[1].part_guid, root.part_guid);
    assert_eq!(after.partitions[1].last_lba, outcome.new_last_lba);
    assert_eq!(after.last_usable_lba, target_size / 512 - 34);
    assert_marker(&disk, root.offset_bytes() + root.size_bytes() - 20);
    let mut old_header = [0u8; 8];
    disk.read_exact_at(&mut old_header, old_backup_header).unwrap();
    assert_eq!(old_header, [0; 8], "the old backup header is cleared");

    // Running it again finds the table in place and changes nothing.
    let gpt_bytes_before = head_and_tail(&disk, target_size);
    let again = partition::relocate_backup_and_grow_last(&disk, 512).unwrap();
    assert!(!again.backup_moved && !again.grown());
    assert_eq!(again.old_last_lba, outcome.new_last_lba);
    assert!(head_and_tail(&disk, target_size) == gpt_bytes_before, "the table was rewritten");
}

#[test]
fn relocate_on_a_disk_of_the_image_size_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", 64 * MIB);
    let disk = open_rw(&path);
    let plan = plan_and_write(&disk, &esp_and_root()[1..], 64 * MIB, 512);
    let bytes_before = std::fs::read(&path).unwrap();
    let outcome = partition::relocate_backup_and_grow_last(&disk, 512).unwrap();
    assert_eq!(outcome.partition_number, 1);
    assert_eq!(
        (outcome.old_last_lba, outcome.new_last_lba),
        (plan.partitions[0].last_lba, plan.partitions[0].last_lba)
    );
    assert!(!outcome.backup_moved && !outcome.grown());
    assert_eq!(std::fs::read(&path).unwrap(), bytes_before);
}

#[test]
fn relocate_refuses_a_disk_smaller_than_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", 64 * MIB);
    let disk = open_rw(&path);
    plan_and_write(&disk, &esp_and_root()[1..], 64 * MIB, 512);
    disk.set_len(32 * MIB).unwrap();
    let error = partition::relocate_backup_and_grow_last(&disk, 512).unwrap_err();
    assert!(
        matches!(error, PartitionError::DiskSmallerThanTable { table_sectors: 131072, disk_sectors: 65536 }),
        "{error:?}"
    );
}

#[test]
fn relocate_keeps_numbering_and_mbr_boot_code_of_an_sgdisk_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = sparse_file(dir.path(), "disk.img", 100 * MIB);
    let image = path.to_str().unwrap();
    // Partitions 1 and 3 with a gap in the numbering, like many cloud images; boot code in LBA 0.
    run(
        "sgdisk",
        &[
            "-n", "1:0:+16M", "-t", "1:ef00", "-c", "1:esp", "-n", "3:0:0", "-t", "3:8304", "-c", "3:root",
            image,
        ],
    );
    let disk = open_rw(&path);
    disk.write_all_at(&[0xEB; 440], 0).unwrap();
    let image_table = partition::read(&disk, 512).unwrap();
    let numbers: Vec<u32> = image_table.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, [1, 3]);

    disk.set_len(GIB).unwrap();
    let outcome = partition::relocate_backup_and_grow_last(&disk, 512).unwrap();
    assert_eq!(outcome.partition_number, 3);
    assert!(outcome.grown());

    let verify = run("sgdisk", &["-v", image]);
    assert!(verify.contains("No problems found"), "{verify}");
    let info = run("sgdisk", &["-i", "3", image]);
    assert!(info.contains(&format!("Last sector: {} ", outcome.new_last_lba)), "{info}");
    assert!(info.contains("Partition name: 'root'"), "{info}");
    let info = run("sgdisk", &["-i", "1", image]);
    assert!(info.contains(&format!("Last sector: {} ", image_table.partitions[0].last_lba)), "{info}");
    assert_eq!(protective_mbr_sectors(image), (1, GIB / 512 - 1));
    let mut boot_code = [0u8; 440];
    disk.read_exact_at(&mut boot_code, 0).unwrap();
    assert_eq!(boot_code, [0xEB; 440]);
    let after = partition::read(&disk, 512).unwrap();
    assert_eq!(after.partitions.iter().map(|p| p.number).collect::<Vec<_>>(), [1, 3]);
    assert_eq!(after.partitions[1].part_guid, image_table.partitions[1].part_guid);
}

#[test]
fn relocate_and_grow_on_a_4096_byte_sector_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let image_size = 300 * MIB;
    let path = sparse_file(dir.path(), "disk.img", image_size);
    let disk = open_rw(&path);
    // A plain file is fine for writing a 4096-byte layout; sgdisk only reads it right on a device.
    let plan = plan_and_write(&disk, &esp_and_root(), image_size, 4096);
    let root = plan.partitions[1].clone();
    put_marker(&disk, root.offset_bytes() + 4096);
    drop(disk);
    let target_size = 2 * GIB;
    open_rw(&path).set_len(target_size).unwrap();

    let device = LoopDevice::attach(&path, 4096);
    let disk = device.open();
    let outcome = partition::relocate_backup_and_grow_last(&disk, 4096).unwrap();
    assert_eq!(outcome.partition_number, 2);
    assert!(outcome.grown() && outcome.backup_moved);
    assert_eq!((outcome.new_last_lba + 1) % 256, 0);
    assert_eq!(outcome.new_size_bytes(), target_size - 258 * MIB);

    let verify = run("sgdisk", &["-v", &device.path]);
    assert!(verify.contains("No problems found"), "{verify}");
    let info = run("sgdisk", &["-i", "2", &device.path]);
    assert!(info.contains(&format!("Last sector: {} ", outcome.new_last_lba)), "{info}");
    assert!(info.contains(&format!("Partition unique GUID: {}", upper(&root.part_guid))), "{info}");
    assert_eq!(protective_mbr_sectors(&device.path), (1, target_size / 4096 - 1));
    let table = partition::read(&disk, 4096).unwrap();
    assert!(table.backup_at_end);
    assert_eq!(table.last_usable_lba, target_size / 4096 - 6);
    assert_marker(&disk, root.offset_bytes() + 4096);
}
