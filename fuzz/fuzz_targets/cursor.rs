#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| streamline_fuzz::cursor(data));
