//! See `src/lib.rs` (`check_registry_decode`) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| modelwatch_fuzz::check_registry_decode(data));
