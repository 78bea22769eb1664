//! Linux swap areas: the version-1 header `mkswap` writes, produced natively.

use std::fs::File;
use std::os::unix::fs::FileExt;

use gridforge_proto::v1::Filesystem;
use uuid::Uuid;

use super::{FsError, FsInfo, check_range, clear_signatures};

/// The page size the header is laid out for; x86-64 and most arm64 kernels use it.
pub const PAGE_SIZE: u64 = 4096;
/// mkswap refuses areas smaller than ten pages.
pub const MIN_PAGES: u64 = 10;
pub const MAGIC: &[u8; 10] = b"SWAPSPACE2";
pub const LABEL_MAX: usize = 16;

// Offsets in the first page (`struct swap_header` in the kernel's include/linux/swap.h): 1024 boot bytes,
// then version, last_page, nr_badpages, uuid[16], volume_name[16].
const VERSION_AT: usize = 1024;
const LAST_PAGE_AT: usize = 1028;
const BAD_PAGES_AT: usize = 1032;
pub(crate) const UUID_AT: usize = 1036;
pub(crate) const LABEL_AT: usize = 1052;
const MAGIC_AT: usize = PAGE_SIZE as usize - MAGIC.len();

/// Makes `[offset, offset + len)` of `disk` a swap area with `uuid` and `label` (at most 16 bytes).
/// Only the first page is written (after the start of the range is cleared of older signatures).
pub fn make(disk: &File, offset: u64, len: u64, uuid: Uuid, label: &str) -> Result<FsInfo, FsError> {
    if label.len() > LABEL_MAX {
        return Err(FsError::InvalidLabel {
            kind: "swap",
            label: label.to_owned(),
            reason: "longer than 16 bytes",
        });
    }
    if label.contains('\0') {
        return Err(FsError::InvalidLabel {
            kind: "swap",
            label: label.to_owned(),
            reason: "contains a NUL byte",
        });
    }
    let pages = len / PAGE_SIZE;
    if pages < MIN_PAGES {
        return Err(FsError::TooSmall { what: "swap", needed: MIN_PAGES * PAGE_SIZE, got: len });
    }
    let last_page = u32::try_from(pages - 1)
        .map_err(|_| FsError::Unsupported(format!("swap area of {len} bytes has more than 2^32 pages")))?;
    check_range(disk, offset, len)?;
    clear_signatures(disk, offset, len)?;

    // The kernel reads these fields in native byte order.
    let mut page = vec![0u8; PAGE_SIZE as usize];
    page[VERSION_AT..VERSION_AT + 4].copy_from_slice(&1u32.to_ne_bytes());
    page[LAST_PAGE_AT..LAST_PAGE_AT + 4].copy_from_slice(&last_page.to_ne_bytes());
    page[BAD_PAGES_AT..BAD_PAGES_AT + 4].copy_from_slice(&0u32.to_ne_bytes());
    page[UUID_AT..UUID_AT + 16].copy_from_slice(uuid.as_bytes());
    page[LABEL_AT..LABEL_AT + label.len()].copy_from_slice(label.as_bytes());
    page[MAGIC_AT..].copy_from_slice(MAGIC);
    disk.write_all_at(&page, offset).map_err(|source| FsError::io("writing the swap header", source))?;

    Ok(FsInfo { kind: Filesystem::Swap, uuid: uuid.hyphenated().to_string(), label: label.to_owned() })
}
