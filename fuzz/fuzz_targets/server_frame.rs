//! libFuzzer entry point for `editiond_fuzz::server_frame` (see src/lib.rs for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| editiond_fuzz::server_frame(data));
