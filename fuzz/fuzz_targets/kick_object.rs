//! libFuzzer entry point for `editiond_fuzz::kick_object` (see src/lib.rs for what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| editiond_fuzz::kick_object(data));
