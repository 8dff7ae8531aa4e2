//! The file-restore path over arbitrary disk images: partition table (GPT, MBR), file-system
//! detection, NTFS and ext4 listing and file reads. Seeds (engine/restore/fuzz/corpus) are real
//! images made by sgdisk, sfdisk, mkfs.ext4 and mkntfs, in the sparse encoding of
//! `blockvault_restore::encode_sparse`. Run: `cargo fuzz run disk_image` in engine/restore.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    blockvault_restore::fuzz_disk_image(data);
});
