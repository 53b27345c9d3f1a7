#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| streamline_fuzz::patch_body(data));
